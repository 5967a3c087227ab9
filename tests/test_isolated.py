"""bench/isolated.py: a crash of native code in the child process is one error line in the parent, which lives on;
the same for bench/generate.py's --peer worker processes.

    python -m pytest tests/test_isolated.py -q

No real crash of llama.cpp is needed: the children below kill themselves with the signals llama.cpp's failures
raise (SIGSEGV: a general protection fault in libggml-cpu.so's AMX path; SIGILL: a wheel built for another CPU).
"""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench.isolated import ChildError, run_isolated


def _arrays(n, scale=2.0):
    return {"x": np.arange(n) * scale, "n": np.array(n)}


def _one_array(n):
    return np.ones(n, dtype=np.float32)


def _kill_self(sig):
    os.kill(os.getpid(), sig)


def _raise():
    raise ValueError("bad shape (3, 4) in the child")


def test_results_come_back_through_the_file():
    got = run_isolated(_arrays, 4, scale=0.5, label="test child")
    assert np.array_equal(got["x"], [0, 0.5, 1, 1.5]) and int(got["n"]) == 4
    one = run_isolated(_one_array, 3, label="test child")
    assert one.dtype == np.float32 and one.shape == (3,)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL], ids=["SIGSEGV", "SIGILL"])
def test_a_crash_is_one_line_naming_the_signal(sig):
    with pytest.raises(ChildError) as e:
        run_isolated(_kill_self, sig, label="llama.cpp (libggml-cpu.so)")
    msg = str(e.value)
    assert e.value.signal == sig.name and sig.name in msg and "llama.cpp (libggml-cpu.so)" in msg, msg
    assert "\n" not in msg and "_kill_self" in msg, msg


def test_a_crash_fails_one_test_with_a_message(tmp_path):
    """What tests/test_export_gguf.py does, in a pytest run of its own: pytest.fail on ChildError. The run reports
    one failed test naming the signal, and the next test still runs (the crash did not take pytest down)."""
    (tmp_path / "test_child.py").write_text(textwrap.dedent("""
        import os, signal
        import pytest
        from bench.isolated import ChildError, run_isolated

        def segfault():
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_crashes():
            try:
                run_isolated(segfault, label="llama.cpp (libggml-cpu.so)")
                crash = None
            except ChildError as e:
                crash = str(e)
            if crash:
                pytest.fail(crash, pytrace=False)

        def test_after():
            pass
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("CI", None)                          # with CI set, pytest's summary line repeats the message untruncated
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_child.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "1 failed, 1 passed" in out, out
    lines = [ln for ln in out.splitlines() if "crashed with" in ln and not ln.startswith("FAILED ")]
    assert lines == ["llama.cpp (libggml-cpu.so) crashed with SIGSEGV in segfault (child process, exit code -11)"], out


def test_an_exception_is_its_last_line():
    with pytest.raises(ChildError) as e:
        run_isolated(_raise, label="test child")
    assert e.value.signal is None and "ValueError: bad shape (3, 4) in the child" in str(e.value), str(e.value)


def test_a_function_of_a_module_run_with_python_m(tmp_path):
    """`python -m bench.quality --peer` calls run_isolated on its own top-level function: __main__ is resolved to
    the module's importable name, so the child can import it."""
    pkg = tmp_path / "isopkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent("""
        import numpy as np
        from bench.isolated import run_isolated

        def twice(n):
            return np.arange(n) * 2

        if __name__ == "__main__":
            print(run_isolated(twice, 4, label="test child").tolist())
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "isopkg.mod"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[0, 2, 4, 6]", r.stdout + r.stderr


def test_a_local_function_is_refused():
    def local():
        return np.zeros(1)
    with pytest.raises(ValueError, match="top-level function"):
        run_isolated(local, label="test child")


def test_a_dead_bench_worker_is_one_line(tmp_path):
    """bench/generate.py --peer: a worker killed mid-run (llama.cpp's SIGSEGV) is a WorkerDied line, not a dump."""
    import tempfile

    from bench.generate import WorkerDied, _Worker
    w = _Worker.__new__(_Worker)                           # the pipes and log of __init__, without a real model
    w.side, w.model = "llama.cpp", "smollm2-135m"
    w.log = tempfile.NamedTemporaryFile("w+", dir=tmp_path, suffix=".log")
    w.proc = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; sys.stdin.readline(); "
                               "print('ggml: about to fault', file=sys.stderr, flush=True); "
                               "os.kill(os.getpid(), signal.SIGSEGV)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=w.log, text=True)
    with pytest.raises(WorkerDied) as e:
        w.ask({"op": "gen"})
    assert str(e.value) == "bench worker llama.cpp (smollm2-135m) was killed by SIGSEGV on 'gen': ggml: about to fault"
    assert w.close()["maxrss_kb"] != w.close()["maxrss_kb"]                      # NaN: nothing to ask a dead worker
