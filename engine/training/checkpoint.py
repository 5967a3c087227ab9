"""Training checkpoints, written atomically: a checkpoint directory is complete or absent, never half-written
(what does not hold: the final OUT/adapters/ written after the last step is atomic per file, temp + rename, not as
a directory: a run killed while writing it can leave some roles' adapters and not others).

    OUT/checkpoints/step_000050/
        adapters/<role>/adapter_model.safetensors + adapter_config.json    (PEFT format, engine.lora.save_peft)
        optimizer.safetensors   the adapter optimizer's state (moments, fp32 masters, per-adapter step counts)
        rng_rank<r>.safetensors torch / python / numpy (/ cuda) RNG states of each rank
        trainer_state.json  step, data cursor, learning-rate schedule, the recipe
        manifest.json       size + sha256 of every file above (written last)

How: everything goes into OUT/checkpoints/.tmp_step_000050/, each file is fsync'ed, then the directory is
fsync'ed and renamed to step_000050 (rename is atomic on POSIX), then the parent is fsync'ed. A crash at any
point leaves either no step_000050 or a complete one; stale .tmp_* directories are swept at the next start.
Old checkpoints are retired the same way in reverse: renamed to .trash_* first, then deleted.

    from engine.training.checkpoint import latest, latest_good, verify
    path = latest("runs/x/checkpoints")        # newest complete checkpoint or None
    verify(path)                               # re-hash every file against the manifest
    path = latest_good("runs/x/checkpoints", log=print)   # newest one that verifies (resume), naming the bad ones

Nothing in a checkpoint is unpickled: the optimizer and RNG states are safetensors files (`save_state`: tensors as
tensors, the rest of the structure as JSON in the file's metadata), so loading one runs no code from the directory.
Checkpoints of older versions (optimizer.pt, rng_rank<r>.pt) are read with torch.load(weights_only=True) only, which
builds tensors and plain containers and refuses anything else (their numpy RNG state among it: then the RNG is not
restored, with a warning).

A failed write (disk full: OSError ENOSPC) inside `with writing(root, step):` removes the temp dir and raises
CheckpointWriteError, one line naming the file and the last good checkpoint, which was never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp_{step_dir_name(step)}"


def sweep(root: Path) -> None:
    """Remove leftovers of interrupted writes/deletes (.tmp_*, .trash_*). Call on the main rank at start."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp_", ".trash_")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out)


def latest(root: str | Path) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def latest_good(root: str | Path, log=None) -> Path | None:
    """The newest checkpoint that passes `verify`, newest first; each one that fails is named through `log` (one line:
    which file, what differs) and the previous one is tried. None when there are none; ValueError when every one
    fails (resuming from nothing would silently restart the run)."""
    cks = list_checkpoints(root)
    for _, path in reversed(cks):
        try:
            verify(path)
            return path
        except (ValueError, OSError) as e:
            if log is not None:
                log(f"resume: {path} fails its manifest check ({e}); falling back to the previous checkpoint")
    if cks:
        raise ValueError(f"{root}: none of the {len(cks)} checkpoints passes its manifest check (see above); "
                         f"nothing to resume from (start over with --overwrite)")
    return None


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, I/O error); the last good checkpoint is untouched."""


@contextlib.contextmanager
def writing(root: Path, step: int):
    """Wrap a checkpoint's writes (into tmp_dir(root, step)) and `finalize`: a failed write removes the half-written
    temp dir and becomes one line naming the file, the cause, the free space and the last good checkpoint. The
    previous checkpoints are never touched before the new one is complete, so they stay as they were.
    A full disk surfaces as OSError(ENOSPC) from Python's own writes, SafetensorError("... No space left on device")
    from safetensors, and RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos") from torch.save."""
    from safetensors import SafetensorError
    tmp = tmp_dir(root, step)
    try:
        yield tmp
    except (OSError, RuntimeError, SafetensorError) as e:
        try:
            st = os.statvfs(root)
            free = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on {root}"
        except OSError:
            free = f"free space on {root} unknown"
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest(root)
        os_err = _os_error_in(e)                  # torch.save's "unexpected pos" hides ENOSPC in its __context__
        cause = os_err.strerror if os_err is not None and os_err.strerror else f"{type(e).__name__}: {e}"
        where = os_err.filename if os_err is not None and os_err.filename else tmp
        msg = (f"{where}: writing checkpoint {step_dir_name(step)} failed: {cause} ({free}); "
               f"last good checkpoint: {last if last else 'none'} (left intact)")
        raise CheckpointWriteError(" ".join(msg.splitlines())) from e


def _os_error_in(e: BaseException | None) -> OSError | None:
    """The first OSError in an exception's chain (itself, its __cause__, its __context__, ...)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file object, then fsync: a full disk then raises (in the chain) the OSError
    ENOSPC naming the file, where torch's own file writer says only "unexpected pos"."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            inner = _os_error_in(e)
            if inner is not None and inner.filename is None:
                raise OSError(inner.errno, inner.strerror, str(path)) from e
            raise


def save_state(obj, path: Path) -> None:
    """A tree of dicts, lists, tuples, numbers, strings and None with torch tensors and numpy arrays as leaves -> one
    safetensors file: the tensors as tensors, the tree as JSON in the metadata ("tree"). No pickle: `load_state`
    runs no code from the file. fsync'ed; a full disk raises OSError naming the file (as save_torch)."""
    from safetensors.torch import save as st_save
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            tensors[str(len(tensors))] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": str(len(tensors) - 1)}
        if isinstance(x, np.ndarray):
            tensors[str(len(tensors))] = torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "ui" else x.copy())
            return {"__ndarray__": str(len(tensors) - 1), "dtype": str(x.dtype)}
        if isinstance(x, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"{path}: cannot store a {type(x).__name__} in a checkpoint (no pickling)")
    data = st_save(tensors, metadata={"tree": json.dumps(enc(obj))})
    with open(path, "wb") as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e


def load_state(path: Path):
    """Invert save_state; ValueError naming the file for anything that is not what save_state writes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    try:
        raw = Path(path).read_bytes()
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
        tree = json.loads(meta["tree"])
    except (SafetensorError, ValueError, KeyError, RecursionError, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{path}: not a checkpoint state file ({type(e).__name__}: {str(e)[:200]})") from None

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        return {_hashable(dec(k)): dec(v) for k, v in x["__dict__"]}
    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: malformed state tree ({type(e).__name__}: {str(e)[:200]})") from None


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def read_state(ckpt_dir: Path, name: str):
    """`name` (optimizer, rng_rank<r>) from a checkpoint: NAME.safetensors (load_state); from a checkpoint of an
    older version NAME.pt through torch.load(weights_only=True), which unpickles no code. ValueError naming the file
    when it is refused; FileNotFoundError naming it when neither is there."""
    new, old = Path(ckpt_dir) / f"{name}.safetensors", Path(ckpt_dir) / f"{name}.pt"
    if new.is_file():
        return load_state(new)
    if not old.is_file():
        raise FileNotFoundError(f"{new}: missing from the checkpoint")
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                          # "pickle protocol 4": refused or read anyway
            return torch.load(old, map_location="cpu", weights_only=True)
    except Exception as e:                                           # UnpicklingError and whatever a bad file gives
        raise ValueError(f"{old}: not loaded: it holds more than tensors and plain containers, and nothing in a "
                         f"checkpoint is unpickled ({type(e).__name__})") from None


def clear_run(out: Path) -> list[str]:
    """`--overwrite`: retire an earlier run's outputs in `out` (checkpoints/, adapters/, train_summary.json,
    metrics.jsonl, wandb_run_id) so nothing of it mixes with the new run. Returns the names removed."""
    removed = []
    for name in ("checkpoints", "adapters", "train_summary.json", "metrics.jsonl", "wandb_run_id"):
        p = out / name
        if p.is_dir():
            trash = out / f".trash_{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(p, trash)                           # gone from view at once, then deleted
            shutil.rmtree(trash)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def finished_adapters(out: Path) -> list[Path]:
    """The adapter_config.json files of a finished run in `out` (its final PEFT adapters)."""
    d = out / "adapters"
    return sorted(d.glob("*/adapter_config.json")) if d.is_dir() else []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what rng_state() gave (ValueError for a state of the wrong shape: the file was not ours)."""
    try:
        _set_rng_state(st)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"RNG state of the wrong form ({type(e).__name__}: {str(e)[:200]})") from None


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def write_rng(tmp: Path, rank: int) -> None:
    """Each rank writes its own RNG file into the temp dir (before finalize on the main rank)."""
    save_state(rng_state(), tmp / f"rng_rank{rank}.safetensors")


def finalize(root: Path, step: int, keep: int) -> Path:
    """Main rank, after every file is in the temp dir: manifest, fsync, atomic rename, retire old ones."""
    tmp, final = tmp_dir(root, step), root / step_dir_name(step)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {}
    for p in files:
        _fsync(p)
        manifest[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / "manifest.json")
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync(d)                                                   # directory entries, deepest first
    if final.exists():                                              # same step written before (complete): replace
        trash = root / f".trash_{final.name}"
        os.rename(final, trash)
        shutil.rmtree(trash)
    os.rename(tmp, final)
    _fsync(root)
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            trash = root / f".trash_{old.name}"
            os.rename(old, trash)
            _fsync(root)
            shutil.rmtree(trash)
    return final


def verify(path: str | Path) -> None:
    """Raise ValueError unless every file listed in the manifest is present with its size and sha256."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise ValueError(f"{path}: no manifest.json (not a complete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
        ok = isinstance(manifest, dict) and all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                for v in manifest.values())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        ok = False
    if not ok:
        raise ValueError(f"{mf}: not a manifest (a JSON object: file -> bytes, sha256)")
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    if on_disk != set(manifest):
        raise ValueError(f"{path}: files {sorted(on_disk ^ set(manifest))} differ from the manifest")
    for rel, info in manifest.items():
        p = path / rel
        if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise ValueError(f"{p}: size or sha256 differs from the manifest")
