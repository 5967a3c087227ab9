"""Hostile programs against eval/sandbox.py: each gets the right verdict within its limits, this process
keeps going, nothing is left running and nothing is written outside the sandbox.

    python -m pytest tests/eval/test_sandbox.py -q

Guarantees that the machine's sandbox mode does not claim (eval.sandbox.isolation()) are skipped with
the reason, never silently passed.
"""
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from eval.sandbox import Limits, isolation, run_program

ISO = isolation()
FAST = Limits(wall_s=3, cpu_s=3, test_timeout_s=3)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def needs(flag):
    return pytest.mark.skipif(not ISO[flag], reason=f"sandbox mode {ISO['mode']!r} does not provide {flag}")


def leftovers(*needles: str, wait_s: float = 2.0) -> list[str]:
    """Processes whose command line contains any needle (polled: the kernel reaps asynchronously)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in cmd for n in needles) and int(pid) != os.getpid():
                found.append(f"{pid}: {cmd[:120]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_runs_a_program_with_stdin():
    ex = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2\n3\n", FAST)
    assert (ex.stdout, ex.failure, ex.exit_code, ex.done) == ("6\n", None, 0, True)


def test_syntax_and_runtime_errors():
    ex = run_program("def f(:\n    pass", limits=FAST)
    assert ex.failure == "syntax_error" and "line 1" in ex.syntax_error
    ex = run_program("print('partial')\nraise ValueError('boom')", limits=FAST)
    assert ex.failure == "runtime_error" and ex.stdout == "partial\n"
    assert "ValueError: boom" in ex.stderr_excerpt() and "sandbox_child" not in ex.stderr_excerpt()
    ex = run_program("import sys\nsys.exit(3)", limits=FAST)
    assert (ex.failure, ex.exit_code) == ("runtime_error", 3)


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    ex = run_program("while True:\n    pass", limits=Limits(wall_s=2, cpu_s=1))
    assert ex.failure == "timeout", ex
    assert time.monotonic() - t0 < 6
    assert "time limit" in ex.stderr_excerpt()
    assert leftovers(ex.tag) == []


def test_sleeping_forever_times_out_on_the_wall_clock():
    ex = run_program("import time\ntime.sleep(100)", limits=Limits(wall_s=1))
    assert ex.failure == "timeout" and ex.wall_s < 5
    assert leftovers(ex.tag) == []


@needs("nproc_enforced")
def test_fork_bomb_is_contained_and_cleaned_up():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    ex = run_program(code, limits=Limits(wall_s=2, nproc=16))
    assert ex.failure == "timeout", ex
    assert time.monotonic() - t0 < 10
    assert leftovers(ex.tag) == []
    assert run_program("print('still fine')", limits=FAST).stdout == "still fine\n"


def test_allocating_10_gb_is_a_memory_verdict():
    ex = run_program("x = bytearray(10 * 2**30)\nprint('allocated')", limits=FAST)
    assert ex.failure == "memory" and ex.stdout == ""
    ex = run_program("x = []\nwhile True:\n    x.append(bytearray(2**26))", limits=Limits(wall_s=10, memory_bytes=512 << 20))
    assert ex.failure == "memory", ex


def test_writing_a_huge_file_fails():
    ex = run_program("open('big', 'wb').write(b'x' * (64 << 20))", limits=Limits(wall_s=5, file_bytes=1 << 20))
    assert ex.failure == "runtime_error" and "File too large" in ex.stderr


@needs("no_write_outside")
def test_writing_outside_its_directory_fails(tmp_path):
    marker = f"mcl-escape-{uuid.uuid4().hex[:8]}"
    blocked = [str(tmp_path / marker), os.path.join(REPO, marker), os.path.join(os.path.expanduser("~"), marker)]
    if ISO["readonly_fs"]:
        blocked += [f"/var/tmp/{marker}", f"/usr/{marker}", f"/etc/{marker}"]
    # the program's own tmpfs mounts: allowed, never on the host
    private = [f"/tmp/{marker}", f"/dev/shm/{marker}"] if ISO["private_tmp"] else []
    code = ("import sys\nfor p in sys.stdin.read().split():\n    try:\n        open(p, 'w').write('x')\n"
            "        print('WROTE', p)\n    except OSError as e:\n        print('blocked', p, type(e).__name__)\n"
            "open('inside.txt', 'w').write('fine')\nprint('inside ok', open('inside.txt').read())\n")
    ex = run_program(code, "\n".join(blocked + private), FAST)
    assert [line for line in ex.stdout.splitlines() if line.startswith("WROTE")] == [f"WROTE {p}" for p in private]
    assert "inside ok fine" in ex.stdout
    assert [t for t in blocked + private if os.path.exists(t)] == []


@needs("net_namespace")
def test_network_is_unreachable():
    for code in ["import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
                 "import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 53))",
                 "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('1.1.1.1', 53))"]:
        ex = run_program(code, limits=FAST)
        assert ex.failure == "runtime_error" and "PermissionError" in ex.stderr, ex
    # below the socket patch: the namespace has no interface but loopback
    ex = run_program("print(open('/proc/net/dev').read())", limits=FAST)
    ifaces = {line.split(":")[0].strip() for line in ex.stdout.splitlines() if ":" in line}
    assert ifaces == {"lo"}, ex.stdout


def test_printing_a_gigabyte_is_cut_off():
    t0 = time.monotonic()
    ex = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits=Limits(wall_s=20, output_bytes=1 << 20))
    assert ex.failure == "runtime_error" and ex.output_exceeded
    assert len(ex.stdout) <= 1 << 20
    assert time.monotonic() - t0 < 10
    assert "output limit" in ex.stderr_excerpt()
    assert leftovers(ex.tag) == []


@needs("parent_unkillable")
def test_killing_its_parent_or_everything_harms_nobody():
    for code in ["import os\nos.kill(os.getppid(), 9)\nprint('after')",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('after')",
                 "import os, signal\nos.killpg(0, signal.SIGKILL)\nprint('after')"]:
        ex = run_program(code, limits=FAST)
        assert ex.failure in (None, "runtime_error"), ex   # refused (EPERM/ESRCH) or killed itself
        assert leftovers(ex.tag) == []
    assert run_program("print('harness alive')", limits=FAST).stdout == "harness alive\n"


def test_background_children_are_killed():
    marker = f"mcl-bg-{uuid.uuid4().hex[:8]}"
    sleeper = f"import time; time.sleep(60)  # {marker}"
    code = ("import subprocess, sys, os\n"
            f"subprocess.Popen([sys.executable, '-c', {sleeper!r}])\n"
            + (f"subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)\n"
               f"if os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}])\n"
               if ISO["kills_escaped"] else "")
            + "print('returned')\n")
    ex = run_program(code, limits=FAST)
    assert ex.stdout == "returned\n" and ex.failure is None, ex
    assert leftovers(marker, ex.tag) == []


def test_exiting_early_with_status_0_is_not_completion():
    ex = run_program("import os\nos._exit(0)", limits=FAST)
    assert not ex.done and ex.exit_code == 0


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("MCL_TEST_SECRET", "hunter2")
    ex = run_program("import os, sys\nprint(sorted(os.environ))\nprint(sys.argv)", limits=FAST)
    assert "MCL_TEST_SECRET" not in ex.stdout and "hunter2" not in ex.stdout
    assert "'PATH'" in ex.stdout


def test_hostile_runs_in_parallel_do_not_stop_benign_ones():
    hostile = ["while True:\n    pass", "x = bytearray(10 * 2**30)", "import os\nos._exit(1)",
               "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)"]
    benign = [f"print({i} * {i})" for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda c: run_program(c, limits=Limits(wall_s=2, cpu_s=2)), hostile + benign))
    assert [r.failure for r in runs[:4]] == ["timeout", "memory", "runtime_error", "runtime_error"]
    assert [r.stdout for r in runs[4:]] == [f"{i * i}\n" for i in range(6)]
    assert leftovers(*[r.tag for r in runs]) == []


def test_a_jail_that_cannot_start_is_not_a_verdict(tmp_path, monkeypatch):
    """If unshare is refused (a locked-down container), mode() falls back and a run in the broken mode
    raises instead of blaming the program."""
    import eval.sandbox as sb
    fake = tmp_path / "unshare"
    fake.write_text('#!/bin/sh\necho "unshare: unshare failed: Operation not permitted" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sb, "UNSHARE", [str(fake)] + sb.UNSHARE[1:])
    monkeypatch.setattr(sb, "_mode", None)
    monkeypatch.delenv("MCL_SANDBOX_MODE", raising=False)
    assert sb.mode() != "ns"
    assert sb.run_program("print('fallback')", limits=FAST).stdout == "fallback\n"
    ex = sb._execute({"driver": "program", "code": "print(1)"}, b"", FAST, "ns")
    assert "Operation not permitted" in ex.setup_error
    with pytest.raises(RuntimeError, match="could not start"):
        ex.failure
