"""W&B through the real `wandb` library: an offline run directory holds the recipe as the run config and the per-role
loss history (read back from the .wandb record log); `disabled` writes no wandb files at all.

    python -m pytest tests/train/test_wandb.py -q
"""
import json
import time

import pytest

from engine.roles import ROLES
from engine.training.trainer import load_recipe, train
from tiny_setup import byte_tokenizer, memorisation_rows, read_wandb_records, tiny_model, tiny_tables, write_jsonl, write_recipe

pytest.importorskip("wandb")


def _run(tmp_path, mode, steps=3):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(tmp_path / "out", data, steps=steps)))
    return train(recipe, model=tiny_model(), tokenizer=byte_tokenizer(), wandb_mode=mode)


def test_offline_run_has_config_and_per_role_loss_history(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _run(tmp_path, "offline")
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((tmp_path / "out").rglob("*"))
    records = []
    for _ in range(100):                                      # the wandb-core service may still be flushing
        records = read_wandb_records(runs[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    config = {}
    for r in records:                                         # the run record carries the initial config
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            config[item.key] = json.loads(item.value_json)
    assert config.get("train", {}).get("steps") == 3 and config["lora"]["roles"] == list(ROLES), config.keys()
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in row:
                history[row["_step"]] = row
    assert sorted(history) == [1, 2, 3]
    for role in ROLES:
        losses = [history[s][f"train/loss/{role}"] for s in (1, 2, 3)]
        assert all(0 < v < 20 for v in losses), (role, losses)
    assert all(history[s]["perf/tok_s"] > 0 for s in history)


def test_auto_mode_without_key_is_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _run(tmp_path, None, steps=1)                             # recipe says disabled; None = the recipe's mode
    assert not (tmp_path / "out" / "wandb").exists()
    (tmp_path / "b").mkdir()
    _run(tmp_path / "b", "auto", steps=1)
    assert list((tmp_path / "b" / "out" / "wandb").glob("offline-run-*"))


def test_disabled_writes_no_wandb_files(tmp_path):
    _run(tmp_path, "disabled")
    assert not [p for p in tmp_path.rglob("*") if "wandb" in p.name], list(tmp_path.rglob("*"))
    assert (tmp_path / "out" / "metrics.jsonl").is_file()
