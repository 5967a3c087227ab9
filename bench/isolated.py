"""Run one function in a fresh Python process, so that a crash of native code (llama.cpp's SIGSEGV, SIGILL) is one
error line here instead of a dead test run or benchmark.

    from bench.isolated import ChildError, run_isolated
    logits = run_isolated(fn, path, tokens, label="llama.cpp (libllama / libggml-cpu.so)")   # fn's return value

`fn` must be importable by module and name (a top-level function, not one defined in __main__); its arguments
are pickled, its return value is a numpy array or a dict of them, passed back through a temporary .npz file. The
child runs `sys.executable` with the parent's sys.path. A child killed by a signal, or one that raised, becomes
ChildError with one line naming the label and the signal (or the exception's last line); the child's stderr is
copied to ours (pytest shows it under "Captured stderr"). Used by tests/test_export_gguf.py and bench/quality.py.
"""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = """
import importlib, pickle, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    path, module, qualname, payload = pickle.load(f)
sys.path[:0] = [p for p in path if p not in sys.path]
fn = importlib.import_module(module)
for part in qualname.split("."):
    fn = getattr(fn, part)
args, kwargs = pickle.loads(payload)
out = fn(*args, **kwargs)
np.savez(sys.argv[2], **(out if isinstance(out, dict) else {"__value__": out}))
"""


class ChildError(RuntimeError):
    """The child process crashed (`signal` is the signal's name) or raised (`signal` is None)."""

    def __init__(self, message: str, signal_name: str | None = None, stderr: str = ""):
        super().__init__(message)
        self.signal, self.stderr = signal_name, stderr


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def run_isolated(fn, *args, label: str, timeout: float | None = None, **kwargs):
    """fn(*args, **kwargs) in a child process; its array (or dict of arrays) comes back. ChildError on a crash."""
    module = fn.__module__
    if module == "__main__":                            # run as `python -m package.module`: its importable name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    if module == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError(f"run_isolated: {fn.__qualname__} must be a top-level function of an importable module")
    with tempfile.TemporaryDirectory(prefix="mcl_isolated_") as tmp:
        spec, out = Path(tmp) / "call.pkl", Path(tmp) / "out.npz"
        spec.write_bytes(pickle.dumps((sys.path, module, fn.__qualname__, pickle.dumps((args, kwargs)))))
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, str(spec), str(out)], capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildError(f"{label}: {fn.__qualname__} ran past {timeout:g} s in its child process") from None
        if r.stderr:
            sys.stderr.write(r.stderr)
        if r.returncode < 0:
            name = _signal_name(r.returncode)
            raise ChildError(f"{label} crashed with {name} in {fn.__qualname__} (child process, exit code "
                             f"{r.returncode})", name, r.stderr)
        if r.returncode != 0 or not out.is_file():
            last = next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), f"exit code {r.returncode}")
            raise ChildError(f"{label}: {fn.__qualname__} failed in its child process: {last.strip()}", None, r.stderr)
        with np.load(out, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    return got["__value__"] if set(got) == {"__value__"} else got
