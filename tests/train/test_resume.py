"""Checkpoints and resume: a run SIGKILLed at a random step and resumed ends with bitwise the same adapters as an
uninterrupted run (CPU fp32); every checkpoint directory on disk is complete (matches its manifest); an interrupted
write leaves no step_* directory; a NaN loss stops the run with a clear message and the last good checkpoint intact.

    python -m pytest tests/train/test_resume.py -q
"""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.training import checkpoint as ckpt
from engine.training.trainer import load_recipe, train
from tiny_setup import byte_tokenizer, memorisation_rows, read_adapters, tiny_model, tiny_tables, write_jsonl, write_recipe

RUN_TINY = Path(__file__).parent / "run_tiny.py"
STEPS = 16


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = str(Path(__file__).parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _recipe(tmp_path, name, **train_kw):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(4))
    tables = tiny_tables(tmp_path / name, data, steps=STEPS, ckpt_every=2, keep_checkpoints=3, weight_decay=0.01,
                         **train_kw)
    return write_recipe(tmp_path / f"{name}.toml", tables)


def _logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([int(l.split(",", 1)[0].split(":")[1]) for l in lines if l.endswith("}")] or [0])


def _verify_all(out: Path):
    root = out / "checkpoints"
    for _, path in ckpt.list_checkpoints(root):
        ckpt.verify(path)                                     # every file present, sizes and hashes match


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref = _recipe(tmp_path, "ref")
    subprocess.run([sys.executable, str(RUN_TINY), str(ref)], env=_env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    want = read_adapters(tmp_path / "ref" / "adapters")

    run = _recipe(tmp_path, "run")
    out = tmp_path / "run"
    rng = random.Random(os.getpid())
    kills = []
    for attempt in range(2):                                  # kill twice: a fresh run, then a resumed one
        kill_at = rng.randint(3 + 6 * attempt, 6 + 6 * attempt)
        args = [sys.executable, str(RUN_TINY), str(run)] + (["--resume"] if attempt else [])
        p = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while _logged_steps(out) < kill_at and p.poll() is None and time.time() - t0 < 240:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(_logged_steps(out))
        _verify_all(out)
    assert kills[-1] < STEPS, f"the run finished before it could be killed (kills at {kills})"
    done = subprocess.run([sys.executable, str(RUN_TINY), str(run), "--resume"], env=_env(), check=True, timeout=300,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    resumed = re.search(r"resume: \S+step_(\d+) \(step (\d+)\)", done.stderr)
    assert resumed and int(resumed.group(2)) >= 2, done.stderr[-2000:]      # really continued, not restarted
    got = read_adapters(out / "adapters")
    assert want.keys() == got.keys()
    diff = [k for k in want if not torch.equal(want[k], got[k])]
    assert not diff, f"killed after steps {kills}; {len(diff)} tensors differ, e.g. {diff[0]}"
    _verify_all(out)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 14, 16]


def test_interrupted_checkpoint_write_leaves_no_step_dir(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    tmp = ckpt.tmp_dir(root, 5)
    tmp.mkdir(parents=True)
    (tmp / "optimizer.safetensors").write_bytes(b"x" * 100)
    real_rename = os.rename

    def crash(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(ckpt.os, "rename", crash)
    with pytest.raises(OSError):
        ckpt.finalize(root, 5, keep=2)
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert ckpt.latest(root) is None                          # only .tmp_step_000005 exists
    ckpt.sweep(root)
    assert list(root.iterdir()) == []
    tmp.mkdir()
    (tmp / "optimizer.safetensors").write_bytes(b"y" * 10)
    path = ckpt.finalize(root, 5, keep=2)
    ckpt.verify(path)
    (path / "optimizer.safetensors").write_bytes(b"y" * 9)             # a truncated file is caught
    with pytest.raises(ValueError, match="optimizer.safetensors"):
        ckpt.verify(path)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(tmp_path / "out", data, steps=10,
                                                                      ckpt_every=2)))
    model = tiny_model()
    calls = {"n": 0}
    micro_per_step = recipe.train.global_batch // recipe.train.micro_batch

    def poison(module, inputs, output):                       # NaN logits from step 5 on
        calls["n"] += 1
        if calls["n"] > 4 * micro_per_step:
            return output * float("nan")
    model.model.norm.register_forward_hook(poison)
    with pytest.raises(RuntimeError) as e:
        train(recipe, model=model, tokenizer=byte_tokenizer())
    msg = str(e.value)
    assert "non-finite loss at step 5" in msg and "step_000004" in msg, msg
    last = ckpt.latest(tmp_path / "out" / "checkpoints")
    assert last.name == "step_000004"
    ckpt.verify(last)
    assert not (tmp_path / "out" / "adapters").exists()        # no final adapters from a failed run
    # the last good checkpoint resumes cleanly
    recipe.train.steps = 6
    train(recipe, model=tiny_model(), tokenizer=byte_tokenizer(), resume=True)
    assert (tmp_path / "out" / "adapters" / "coder" / "adapter_model.safetensors").is_file()


def test_rerun_into_a_used_out_dir_needs_resume(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(tmp_path / "out", data, steps=2, ckpt_every=1)))
    train(recipe, model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="pass --resume"):
        train(recipe, model=tiny_model(), tokenizer=byte_tokenizer())


def test_nan_gradient_with_finite_loss_also_stops(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(tmp_path / "out", data, steps=6, ckpt_every=1)))
    model = tiny_model()
    state = {"n": 0}

    def poison(module, grad_in, grad_out):                    # NaN gradients flowing back from step 3 on
        state["n"] += 1
        if state["n"] > 2 * recipe.train.global_batch // recipe.train.micro_batch:
            return (grad_in[0] * float("nan"),)
    model.model.norm.register_full_backward_hook(poison)
    with pytest.raises(RuntimeError, match=r"non-finite gradient at step 3 .*Last good checkpoint: \S+step_000002"):
        train(recipe, model=model, tokenizer=byte_tokenizer())
    ckpt.verify(ckpt.latest(tmp_path / "out" / "checkpoints"))
