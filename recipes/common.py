"""What every recipe stage shares (distill, correct, mutate, build_sft, main_job, e2e): configuration, provenance,
the teacher backend and thread policy, and append-only JSONL that survives a kill.

    from recipes.common import load_config, run_record, open_backend, set_threads, read_jsonl_resumable
    cfg = load_config(DistillConfig, "recipes/mini_e2e.toml", "distill", ["n_problems=5"])

configuration   load_config: a dataclass from one [table] of a recipe TOML + key=value overrides
provenance      run_record (command as typed, date, git commit); OUT/config.json: check_resume / write_meta
backends        open_backend (our engine, or an OpenAI-compatible endpoint); set_threads (torch CPU threads)
files           read_jsonl_resumable / append_jsonl (resumable records), write_examples (atomic), dedup
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

from engine import config_file


# --- configuration: a TOML table + key=value overrides -----------------------------------------------------

def load_config(cls, path: str | None, table: str, overrides=()):
    """cls() updated from [table] of the recipe TOML at `path`, then from `key=value` overrides (`table.key=value`
    is accepted too): engine/config_file.py, the one loader of every command (TOML literals, a bare word is a
    string; an unknown key or a wrong type is an error naming the file and the key)."""
    return config_file.load(cls, path, overrides, table=table)


def has_table(path: str | None, table: str) -> bool:
    """Whether the recipe TOML at `path` has a [table] (e2e: a recipe without [mutate] skips that stage)."""
    return bool(path) and table in config_file.read_toml(path)


# --- provenance --------------------------------------------------------------------------------------------

def git_commit(tree: Path | None = None) -> str:
    """HEAD of the git checkout holding `tree` (default: this code's own); "" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=tree or Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line() -> str:
    """The command as typed: `mcl ...`, `python -m package.module ...` or `python file ...`."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    prog = Path(sys.argv[0])
    if prog.name == "mcl":
        return f"mcl {args}"
    root = Path(__file__).resolve().parents[1]
    if prog.suffix == ".py" and prog.resolve().is_relative_to(root):     # run as python -m recipes.x
        return f"python -m {'.'.join(prog.resolve().relative_to(root).with_suffix('').parts)} {args}"
    return f"python {shlex.quote(sys.argv[0])} {args}"


def run_record(**extra) -> dict:
    """What one invocation of a recipe stage was: the exact command, when, at which commit."""
    return {"command": command_line(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), **extra}



def check_resume(out: Path, cfg, fields, stage: str) -> dict:
    """Load or create OUT/config.json; refuse a rerun whose trajectory-shaping fields differ."""
    path = out / "config.json"
    now = {k: getattr(cfg, k) for k in fields}
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved["pinned"].get(k), v) for k, v in now.items() if saved["pinned"].get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} in {path}, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a {stage} run with other settings ({what}); use another out= or "
                             f"delete {out}")
        return saved
    return {"stage": stage, "pinned": now, "runs": []}


def write_meta(out: Path, meta: dict, cfg) -> None:
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps({**meta, "config": dataclasses.asdict(cfg)}, indent=2) + "\n")
    os.replace(tmp, out / "config.json")



# --- backends and threads ----------------------------------------------------------------------------------

def open_backend(model: str, url: str = "", url_model: str = "", api_key_env: str = "", timeout_s: float = 300.0,
                 retries: int = 2, device: str = "", dtype: str = "", n_slots: int = 8, weights: str = "fp32",
                 step_lock=None):
    """An HTTPBackend when `url` is set, else our engine running `model` on `weights` (fp32 | bf16 | q4: the
    GGUF's own blocks, engine/loading/packed_model.py) (call .close() when done). step_lock: an
    engine.serving.scheduler.TurnLock shared by the local models of one process (their steps take turns)."""
    from engine.agents.backends import HTTPBackend
    from engine.serving.backend import open_local
    if url:
        return HTTPBackend(url, model=url_model or model, api_key=os.environ.get(api_key_env) if api_key_env else None,
                           timeout=timeout_s, retries=retries)
    return open_local(model, device or None, dtype or None, None, n_slots=n_slots, weights=weights or "fp32",
                      step_lock=step_lock)


def set_threads(n: int) -> int:
    """torch CPU threads: n > 0 exactly n; 0 = auto: 1 when the machine is busy (1-minute load average above
    the core count), else torch's default; < 0 = torch's default. Why: with more runnable threads than cores,
    OpenMP regions wait on descheduled peers -- measured on a loaded 2-core machine, a KV-cache gather went
    from 0.01 ms to 8 ms with 2 threads, and the 0.5B teacher decoded 7x faster with 1 thread than with 2."""
    import torch
    if n == 0 and os.getloadavg()[0] > (os.cpu_count() or 1):
        n = 1
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()



# --- files: append-only JSONL keyed by problem id, atomic example files ------------------------------------

def read_jsonl_resumable(path: Path) -> list[dict]:
    """Every complete record of `path`; a last line cut by a kill (no newline, or not JSON) is truncated away
    so the next append starts on a clean line."""
    if not path.is_file():
        return []
    records, good_end = [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break                                                    # cut mid-line
        line = data[pos:nl]
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError:
            break                                                    # cut mid-line and then appended to? stop here
        pos = good_end = nl + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
        print(f"{path}: dropped {len(data) - good_end} bytes of an unfinished record", file=sys.stderr)
    return records


def append_jsonl(f, rec: dict) -> None:
    f.write(json.dumps(rec, default=repr) + "\n")
    f.flush()
    os.fsync(f.fileno())



def write_examples(path: Path, examples: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)



def example_key(ex: dict) -> str:
    return hashlib.sha256(json.dumps([ex["role"], ex["messages"]], sort_keys=True).encode()).hexdigest()


def dedup(examples: list[dict], rejected: Counter | None = None) -> list[dict]:
    seen, out = set(), []
    for ex in examples:
        key = example_key(ex)
        if key in seen:
            if rejected is not None:
                rejected[ex["role"], "duplicate"] += 1
            continue
        seen.add(key)
        out.append(ex)
    return out

