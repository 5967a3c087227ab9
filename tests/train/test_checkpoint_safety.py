"""`mcl train` and what an earlier run left in its out_dir: finished adapters are not overwritten
without --overwrite; --resume re-hashes each checkpoint against its sha256 manifest and falls back past a corrupt one
with a message; a full disk during a checkpoint write is one error line and the last good checkpoint stays intact
(an injected OSError(ENOSPC), and a real 1-2 MB tmpfs in a private mount namespace where `unshare` allows one).

    python -m pytest tests/train/test_checkpoint_safety.py -q

Every run goes through the real entry point, engine.cli.main(["train", RECIPE, ...]), on the tiny preset with random
weights ("random:tiny") and the byte tokenizer saved as tokenizer.json.
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import cli
from engine.training import checkpoint as ckpt
from tiny_setup import byte_tokenizer, memorisation_rows, read_adapters, tiny_tables, write_jsonl, write_recipe

ROOT = Path(ckpt.__file__).parents[1]                 # the engine under test, for subprocesses


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def make_recipe(tmp_path: Path, name: str, **train_kw) -> Path:
    tok = tmp_path / "tok"
    if not (tok / "tokenizer.json").is_file():
        byte_tokenizer().save(tok)
    data = tmp_path / "sft.jsonl"
    if not data.is_file():
        write_jsonl(data, memorisation_rows(2))
    tables = tiny_tables(tmp_path / name, data, **({"steps": 2} | train_kw))
    tables["model"]["tokenizer"] = str(tok / "tokenizer.json")
    return write_recipe(tmp_path / f"{name}.toml", tables)


def run_mcl(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *map(str, argv)])
    return e.value.code, capsys.readouterr().err


def error_line(code, err) -> str:
    """The run failed with exactly one `mcl train: error:` line, the last one, and no traceback."""
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [l for l in err.splitlines() if "error" in l.lower()]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- finished adapters ----------------------------------------------------------------------------------------------

def test_finished_adapters_need_overwrite(tmp_path, capsys):
    recipe = make_recipe(tmp_path, "out")
    out = tmp_path / "out"
    code, err = run_mcl(capsys, recipe)
    assert code == 0, err
    before = tree_hash(out)

    code, err = run_mcl(capsys, recipe)                                     # again: refused, nothing touched
    line = error_line(code, err)
    assert line == err.strip(), err                                         # the only line: refused before loading
    assert str(out / "adapters") in line and "--overwrite" in line, line
    assert tree_hash(out) == before

    code, err = run_mcl(capsys, recipe, "--resume")                         # nothing to resume: refused as well
    assert "--overwrite" in error_line(code, err)
    assert tree_hash(out) == before

    code, err = run_mcl(capsys, recipe, "train.steps=3", "--overwrite")     # explicit: replaced
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps                                        # the old run's lines are gone
    after = tree_hash(out)
    assert after["adapters/coder/adapter_model.safetensors"] != before["adapters/coder/adapter_model.safetensors"]


# --- resume verifies manifests ---------------------------------------------------------------------------------------

def _corrupt(path: Path) -> None:
    """Flip one byte in the middle: same size, different sha256."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys):
    ref = make_recipe(tmp_path, "ref", steps=5)
    code, err = run_mcl(capsys, ref)
    assert code == 0, err
    want = read_adapters(tmp_path / "ref" / "adapters")

    run = make_recipe(tmp_path, "run", steps=4, ckpt_every=1, keep_checkpoints=3)
    code, err = run_mcl(capsys, run)
    assert code == 0, err
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3, 4]
    _corrupt(root / "step_000004" / "optimizer.safetensors")

    code, err = run_mcl(capsys, run, "train.steps=5", "--resume")
    assert code == 0, err
    assert f"resume: {root / 'step_000004'} fails its manifest check" in err, err
    assert "optimizer.safetensors: size or sha256 differs" in err and "falling back to the previous checkpoint" in err, err
    assert f"resume: {root / 'step_000003'} (step 3)" in err, err
    got = read_adapters(tmp_path / "run" / "adapters")
    diff = [k for k in want if not torch.equal(want[k], got[k])]
    assert want.keys() == got.keys() and not diff, f"{len(diff)} tensors differ from a straight 5-step run"


def test_resume_with_every_checkpoint_corrupt_is_refused(tmp_path, capsys):
    run = make_recipe(tmp_path, "run", steps=2, ckpt_every=1)
    code, err = run_mcl(capsys, run)
    assert code == 0, err
    root = tmp_path / "run" / "checkpoints"
    for _, path in ckpt.list_checkpoints(root):
        (path / "manifest.json").write_text("{not json")
    before = tree_hash(tmp_path / "run")
    code, err = run_mcl(capsys, run, "train.steps=4", "--resume")
    line = error_line(code, err)
    assert f"{root}: none of the 2 checkpoints passes its manifest check" in line, line
    assert err.count("fails its manifest check") == 2, err
    assert tree_hash(tmp_path / "run") == before


# --- a full disk during a checkpoint write ----------------------------------------------------------------------------

def test_disk_full_during_checkpoint_write_keeps_last_good(tmp_path, capsys, monkeypatch):
    run = make_recipe(tmp_path, "run", steps=6, ckpt_every=2)
    real_save = ckpt.save_state

    fired = []

    def save(obj, path, *a, **k):                   # the disk fills up while step 4's optimizer state is written
        if "step_000004" in str(path) and str(path).endswith("optimizer.safetensors"):
            fired.append(path)
            Path(path).write_bytes(b"\0" * 1000)                               # as a real ENOSPC leaves behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(ckpt, "save_state", save)

    code, err = run_mcl(capsys, run)
    assert len(fired) == 1, fired
    line = error_line(code, err)
    root = tmp_path / "run" / "checkpoints"
    assert "No space left on device" in line and "optimizer.safetensors" in line, line
    assert f"last good checkpoint: {root / 'step_000002'} (left intact)" in line, line
    assert [p.name for p in root.iterdir()] == ["step_000002"]           # no half-written .tmp_step_000004
    ckpt.verify(root / "step_000002")
    assert not (tmp_path / "run" / "adapters").exists()

    monkeypatch.setattr(ckpt, "save_state", real_save)                  # space again: the run resumes from step 2
    code, err = run_mcl(capsys, run, "--resume")
    assert code == 0 and f"resume: {root / 'step_000002'} (step 2)" in err, err


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                       capture_output=True, timeout=30)
    return p.returncode == 0


VERIFY = """
import json, sys
from pathlib import Path
from engine.training import checkpoint as ckpt
out = Path(sys.argv[1])
rows = {}
for step, path in ckpt.list_checkpoints(out / "checkpoints"):
    try:
        ckpt.verify(path); rows[path.name] = "ok"
    except ValueError as e:
        rows[path.name] = str(e)
root = out / "checkpoints"
print(json.dumps({"checkpoints": rows, "entries": sorted(p.name for p in root.iterdir()) if root.is_dir() else [],
                  "temp_files": sorted(str(p.relative_to(out)) for p in out.rglob("*tmp*")),
                  "summary": (out / "train_summary.json").exists()}))
"""


@pytest.fixture(scope="module")
def ckpt_sizes(tmp_path_factory) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of its adapters) of the tiny recipe, measured by a one-step run."""
    tmp_path = tmp_path_factory.mktemp("probe")
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("no unprivileged tmpfs mount here (unshare -rm + mount -t tmpfs)")
    probe = make_recipe(tmp_path, "probe", steps=1, ckpt_every=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    subprocess.run([sys.executable, "-m", "engine.cli", "train", str(probe)], env=env, check=True, timeout=300,
                   capture_output=True)
    files = [p for p in (tmp_path / "probe" / "checkpoints").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in files if "adapters" in p.parts)


@pytest.mark.parametrize("what", ["checkpoint", "final adapters"])
def test_real_full_tmpfs(tmp_path, what, ckpt_sizes):
    """out_dir on a small tmpfs in a private mount namespace (nothing is mounted on the host). "checkpoint": room
    for one checkpoint and a half, so the second one runs out of space; "final adapters": no checkpoints, room for
    half of the adapters."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no unprivileged tmpfs mount here (unshare -rm + mount -t tmpfs)")
    ckpt_bytes, adapter_bytes = ckpt_sizes
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if what == "checkpoint":
        limit_kb = int(ckpt_bytes * 1.5) // 1024 + 64                       # + metrics.jsonl, directory entries
        run = make_recipe(tmp_path, "mnt", steps=6, ckpt_every=2, keep_checkpoints=2)   # out_dir = the mount point
    else:
        limit_kb = adapter_bytes // 2 // 1024 + 16
        run = make_recipe(tmp_path, "mnt", steps=2)
    script = (f"mount -t tmpfs -o size={limit_kb}k tmpfs {mnt} || exit 99; "
              f"{sys.executable} -m engine.cli train {run} 2> {tmp_path / 'err.txt'}; echo $? > {tmp_path / 'rc.txt'}; "
              f"{sys.executable} -c '{VERIFY}' {mnt} > {tmp_path / 'report.json'}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=600, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "2", err[-3000:]
    line = error_line(2, err)
    report = json.loads((tmp_path / "report.json").read_text())
    assert "No space left on device" in line, line
    if what == "checkpoint":
        assert "last good checkpoint:" in line and "step_000002 (left intact)" in line, line
        assert report == {"checkpoints": {"step_000002": "ok"}, "entries": ["step_000002"], "temp_files": [],
                          "summary": False}, report
    else:
        assert "adapter_model.safetensors" in line, line
        assert report["temp_files"] == [] and not report["summary"], report
    assert not any(mnt.iterdir()), "the tmpfs leaked out of its mount namespace"


# --- nothing in a checkpoint is unpickled -----------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a checkpoint directory from someone else could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _rehash(path: Path) -> None:
    """Rewrite the manifest for the files now in `path` (whoever plants a payload can do this too)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    (path / "manifest.json").write_text(json.dumps({str(p.relative_to(path)): {
        "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files}))


@pytest.mark.parametrize("victim", ["rng_rank0", "optimizer"])
def test_resume_never_runs_code_from_a_checkpoint(tmp_path, capsys, victim):
    """A pickle with a __reduce__ payload in place of the RNG or optimizer state (new name or the old .pt name) is
    refused, never executed."""
    run = make_recipe(tmp_path, "run", steps=2, ckpt_every=2)
    code, err = run_mcl(capsys, run)
    assert code == 0, err
    last = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (last / f"{victim}.safetensors").is_file() and not list(last.glob("*.pt"))
    marker = tmp_path / "pwned"
    import pickle
    payload = pickle.dumps({"torch": _Payload(marker)})
    for name in (f"{victim}.safetensors", f"{victim}.pt"):                 # the new file holding a pickle, then the old
        for p in last.glob(f"{victim}.*"):
            p.unlink()
        (last / name).write_bytes(payload)
        _rehash(last)
        code, err = run_mcl(capsys, run, "train.steps=3", "--resume")
        assert not marker.exists(), f"{name}: the checkpoint's pickle ran"
        if victim == "optimizer" or name.endswith(".safetensors"):
            line = error_line(code, err)
            assert victim in line, line
        else:
            assert code == 0 and "rng_rank0.pt: not loaded" in err and "RNG state is not restored" in err, err
