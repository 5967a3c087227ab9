"""Training checkpoints, written atomically: a checkpoint directory is complete or absent, never half-written.

    OUT/checkpoints/step_000050/
        adapters/<role>/adapter_model.safetensors + adapter_config.json    (PEFT format, engine.lora.save_peft)
        optimizer.pt        the adapter optimizer's state (moments, fp32 masters, per-adapter step counts)
        rng_rank<r>.pt      torch / python / numpy (/ cuda) RNG states of each rank
        trainer_state.json  step, data cursor, learning-rate schedule, the recipe
        manifest.json       size + sha256 of every file above (written last)

How: everything goes into OUT/checkpoints/.tmp_step_000050/, each file is fsync'ed, then the directory is
fsync'ed and renamed to step_000050 (rename is atomic on POSIX), then the parent is fsync'ed. A crash at any
point leaves either no step_000050 or a complete one; stale .tmp_* directories are swept at the next start.
Old checkpoints are retired the same way in reverse: renamed to .trash_* first, then deleted.

    from engine.checkpoint import latest, verify
    path = latest("runs/x/checkpoints")        # newest complete checkpoint or None
    verify(path)                               # re-hash every file against the manifest
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

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
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def write_rng(tmp: Path, rank: int) -> None:
    """Each rank writes its own RNG file into the temp dir (before finalize on the main rank)."""
    path = tmp / f"rng_rank{rank}.pt"
    torch.save(rng_state(), path)
    _fsync(path)


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
    manifest = json.loads(mf.read_text())
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    if on_disk != set(manifest):
        raise ValueError(f"{path}: files {sorted(on_disk ^ set(manifest))} differ from the manifest")
    for rel, info in manifest.items():
        p = path / rel
        if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise ValueError(f"{p}: size or sha256 differs from the manifest")
