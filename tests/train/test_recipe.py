"""Recipes and the `mcl train` command line: both shipped recipes parse and open with their launch command; key=value
overrides are typed; an unknown key (in a file or an override) is a clear error naming the key and listing the valid
ones; `mcl train` runs end to end and reports bad input as one line with exit code 2.

    python -m pytest tests/train/test_recipe.py -q
"""
import json
from pathlib import Path

import pytest

from engine import cli
from engine.training.trainer import Recipe, load_recipe
from tiny_setup import byte_tokenizer, memorisation_rows, tiny_tables, write_jsonl, write_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.parametrize("name", ["mapcoder_lite_qwen2.5_7b.toml", "mini_smollm2.toml"])
def test_shipped_recipes_parse_and_open_with_launch_command(name):
    path = RECIPES / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"train recipes/{name}" in first, first
    r = load_recipe(path)
    assert r.lora.roles == ["retriever", "planner", "coder", "debugger"] and len(r.lora.targets) == 7
    assert r.train.global_batch % r.train.micro_batch == 0


def test_paper_recipe_values():
    r = load_recipe(RECIPES / "mapcoder_lite_qwen2.5_7b.toml")
    assert r.lora.rank == 32 and r.model.dtype == "bfloat16"
    assert load_recipe(RECIPES / "mini_smollm2.toml").model.name == "smollm2-135m"
    assert load_recipe(RECIPES / "mini_smollm2.toml").data.path == "recipes/data/mini_sft.jsonl"


def test_overrides_are_typed():
    r = load_recipe(None, ["train.lr=1e-3", "train.steps=7", "lora.alpha=8", "wandb.name=my-run",
                           'lora.roles=["planner", "coder"]', "train.fsdp=true", 'model.name="random:tiny"'])
    assert (r.train.lr, r.train.steps, r.lora.alpha, r.wandb.name) == (1e-3, 7, 8.0, "my-run")
    assert r.lora.roles == ["planner", "coder"] and r.train.fsdp is True and r.model.name == "random:tiny"
    assert isinstance(r.lora.alpha, float)


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=5", "unknown recipe key 'train.stepz'"),
    ("trian.steps=5", "unknown recipe key 'trian.steps'"),
    ("steps=5", "unknown recipe key 'steps'"),
    ("train.steps=lots", "train.steps = 'lots': expected int"),
    ("train.fsdp=1", "train.fsdp = 1: expected bool"),
    ("train.steps", "expected table.key=value"),
])
def test_bad_override_is_a_clear_error(override, needle):
    with pytest.raises(ValueError) as e:
        load_recipe(None, [override])
    msg = str(e.value)
    assert needle in msg, msg
    if "unknown" in needle:
        assert "valid keys:" in msg and "train.steps" in msg and "lora.rank" in msg and "wandb.mode" in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("# mcl train r.toml\n[train]\nsteps = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"r.toml: unknown recipe key 'train.learning_rate'; valid keys: .*train.lr"):
        load_recipe(path)
    path.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(ValueError, match="unknown recipe key 'optim.lr'"):
        load_recipe(path)


def test_cli_reports_unknown_key_as_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.toml", {"train": {"steps": 2}})
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(path), "train.stepz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mcl train: error:" in err and "train.stepz" in err and "valid keys" in err


def test_cli_trains_end_to_end(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    byte_tokenizer().save(tok_dir)
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    tables = tiny_tables(tmp_path / "out", data, steps=2)
    tables["model"]["tokenizer"] = str(tok_dir / "tokenizer.json")
    path = write_recipe(tmp_path / "r.toml", tables)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(path), "train.steps=3", "--wandb", "disabled"])
    assert e.value.code == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["roles"] == Recipe().lora.roles
    for role in summary["roles"]:
        cfg = json.loads((tmp_path / "out" / "adapters" / role / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if "train/loss" in l] == [1, 2, 3]
