"""The child side of eval/sandbox.py: set up the jail, then run untrusted code and report through a pipe.

Run only by eval/sandbox.py (stdlib only; never imported by the parent):

    [unshare --net --mount --pid --ipc --uts --fork --kill-child --mount-proc] \\
        python3 -I -S -X utf8 -B eval/sandbox_child.py JOB.marshal RESULT_FD SUPERVISOR_FD

Process tree inside the jail:

    supervisor (trusted; pid 1 of the new pid namespace in "ns"/"userns" mode)
      - caps the IPC namespace's SysV limits, builds the jail's root (an allowlist bound read-only,
        private /dev, /proc, /tmp; see eval/sandbox.py) and chroots into it
      - forks the worker, waits for it, reports {"supervisor": ..., "exit", "signal", "cpu_s"} on
        SUPERVISOR_FD and exits; in a pid namespace its exit kills everything the program left behind
      `- worker: rlimits; drops to the sandbox uid (root) or all capabilities (user namespace);
               no_new_privs; the seccomp filter; closes every fd but RESULT_FD (SUPERVISOR_FD too);
               blocks the socket module; runs a driver:
           "program":   the code as __main__ with stdin/stdout (stdin/stdout problems)
           "functions": setup + code once, then every test (assert / check / call) with a per-test
                        SIGALRM timer; one JSON record per test, one {"i", "k", "got"} per value of an
                        assert the parent took the expected value out of (__mcl_expect__), then
                        {"done": true}

Every worker record is one JSON line on RESULT_FD. The worker shares that fd with the untrusted code,
so a program written to forge records can forge them: the parent decides nothing on a record alone
that the program could know how to fake (expected values are compared there; see eval/harness.py).
A failure of the jail before the program starts goes to SUPERVISOR_FD, which the program never has.
"""
import builtins
import ctypes
import marshal
import os
import resource
import signal
import sys
import time

RESULT_FD = -1       # the worker's records (the untrusted code can write here too)
SUPERVISOR_FD = -1   # the supervisor's: closed in the worker before the untrusted code starts
SETUP_FAILED = 70
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
DEVICES = ("null", "zero", "full", "random", "urandom")
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
_libc = ctypes.CDLL(None, use_errno=True)


_ESCAPES = {i: f"\\u{i:04x}" for i in [*range(32), *range(0xD800, 0xE000)]} | {ord('"'): '\\"', ord("\\"): "\\\\"}


def dumps(v) -> str:
    """JSON for the values jsonable() returns (json itself pulls in `re`: 10+ ms of start-up)."""
    if v is None or isinstance(v, bool):
        return "null" if v is None else "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else \
            "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"
    if isinstance(v, str):
        return '"' + v.translate(_ESCAPES) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(dumps(str(k)) + ":" + dumps(x) for k, x in v.items()) + "}"
    return dumps(repr(v))


def report(obj, fd=None):
    data = (dumps(obj) + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(RESULT_FD if fd is None else fd, data):]


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:   # field 5 is the mount point, with space/tab/newline/backslash octal-escaped
            points.append(line.split()[4].encode().decode("unicode_escape").encode("latin-1").decode())
    return points


def _mkpoint(path, like):
    """Create the mount point `path` (inside the jail root) for the host path `like`: parents 0755."""
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    if os.path.isdir(like):
        os.makedirs(path, 0o755, exist_ok=True)
    elif not os.path.lexists(path):
        open(path, "w").close()


def _bind(src, dst, flags=MS_RDONLY | MS_NOSUID | MS_NODEV):
    """Bind `src` (a host path) at `dst`, then remount the bind with `flags` (a bind ignores them)."""
    _mkpoint(dst, src)
    _mount(src, dst, None, MS_BIND | MS_REC)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | flags)


def _limit_ipc(job):
    """The run's own SysV IPC namespace (unshare --ipc) dies with it; cap it too, so that segments
    created and detached within one run cannot hold more memory than the run may (best effort: in a
    user namespace older kernels refuse these writes)."""
    mem = job["limits"]["memory_bytes"]
    for name, value in (("shmmax", mem), ("shmall", max(1, mem // 4096)), ("shmmni", 64),
                        ("msgmni", 16), ("sem", "250 8000 32 32")):
        try:
            with open(f"/proc/sys/kernel/{name}", "w") as f:
                f.write(str(value))
        except OSError:
            pass


def isolate_filesystem(job):
    """(new mount namespace, as (namespace-)root) build the jail's root from an allowlist and chroot
    into it: the system directories and the interpreter's read-only; a private /dev with only
    null, zero, full, random, urandom (+ a private /dev/shm); a fresh /proc; a private /tmp as cwd.
    Everything else on the host (the repository, benchmark data, /run, /var, /home, /root, host
    sockets) is simply not there; job["hide_paths"] inside the allowed ones are covered by empty
    read-only tmpfs. /tmp and /dev/shm are the only writable places, each a tmpfs of job["tmpfs_size"]."""
    root = job["jail_root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    owner = f",uid={job['uid']},gid={job['uid']}" if job["uid"] is not None else ""
    os.mkdir(root + "/tmp", 0o755)               # first: an interpreter living under /tmp is bound into it
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_size']},mode=700{owner}")
    for path in job["jail_paths"]:               # sorted: parents first
        dst = root + path
        if os.path.islink(path):                 # /bin -> usr/bin on merged-/usr systems
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            if not os.path.lexists(dst):
                os.symlink(os.readlink(path), dst)
        elif os.path.exists(path):
            _bind(path, dst)
    for path in job["hide_paths"]:               # directories (benchmark data inside site-packages)
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=555")
    for point in _mount_points():                # submounts that came with the recursive binds
        if point.startswith(root + "/") and point != root + "/tmp":
            try:
                _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            except OSError:
                pass                             # best effort: some (locked) mounts refuse
    _bind("/proc", root + "/proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)   # no sysctl writes either
    dev = root + "/dev"
    os.mkdir(dev, 0o755)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:                         # the host's nodes, bound: mknod needs more than we have
        if os.path.exists(f"/dev/{name}"):
            _bind(f"/dev/{name}", f"{dev}/{name}", MS_NOSUID | MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm", 0o755)
    _mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    _mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_size']},mode=1777{owner}")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/tmp")


def _set_limits(job):
    lim = job["limits"]
    cpu = max(1, int(lim["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"], lim["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nofile = min(256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    stack_hard = resource.getrlimit(resource.RLIMIT_STACK)[1]   # deep recursion (sys.setrecursionlimit)
    stack = 64 << 20 if stack_hard == resource.RLIM_INFINITY else min(64 << 20, stack_hard)
    resource.setrlimit(resource.RLIMIT_STACK, (stack, stack_hard))
    nproc = lim["nproc"]
    if job["count_user_procs"]:   # plain mode as a normal user: the limit counts all this uid's tasks
        uid = str(os.getuid())
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if fields["Uid"].split()[0] == uid:
                    nproc += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _drop_privileges(job):
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])   # root -> the sandbox uid: all capabilities go with it
    elif job["drop_caps"]:       # user namespace: stay uid 0 inside it, but without capabilities
        for cap in range(64):
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()                  # effective, permitted, inheritable = 0 (x2 words)
        if _libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)   # setuid binaries cannot give privileges back


def _block_network():
    """Defence in depth (the real barrier is the empty network namespace, where available)."""
    import _socket
    import socket

    def blocked(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, blocked)


def _site(job):
    """The interpreter runs with -S (site's .pth processing costs more than the rest of start-up): put
    site-packages on sys.path by hand and define exit()/quit() as site would."""
    import site
    site.setquit()
    for p in job["site_paths"]:
        if p not in sys.path:
            sys.path.append(p)


class TestTimeout(BaseException):
    """Raised by SIGALRM inside a test; a BaseException so `except Exception` in the code can't eat it."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _tb_excerpt(exc, limit=1500):
    """The program's traceback without this file's frames: the runner's at the top, and the SIGALRM handler's
    at the bottom of a timeout (whose path would otherwise end up in the report the debugger reads)."""
    import traceback
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != __file__])
    return "".join(te.format())[-limit:]


def _classify(exc, test_file):
    """status of a failed test: assert (in the test's own code) / timeout / memory / error."""
    if isinstance(exc, TestTimeout):
        return "timeout"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, AssertionError):
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        if tb.tb_frame.f_code.co_filename == test_file:
            return "assert"
    return "error"


def jsonable(value, depth=0):
    """Return values -> JSON values (tuples -> lists, dict keys -> str); anything else -> {"__repr__": ...}."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10 ** 4000 else {"__repr__": "<int too large>"}
    if isinstance(value, float):
        return value
    if depth > 50:
        return {"__repr__": "<nested too deep>"}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k) if isinstance(k, (str, int, float, bool)) or k is None else repr(k): jsonable(v, depth + 1)
                for k, v in value.items()}
    try:
        import numbers
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
    except Exception:
        pass
    try:
        return {"__repr__": repr(value)[:1000]}
    except BaseException:
        return {"__repr__": f"<unprintable {type(value).__name__}>"}


def tagged(value, depth=0):
    """A value for an expectation the parent checks (eval/harness.py `decode_tagged` inverts this):
    containers keep their type ({"list"|"tuple"|"set"|"dict"|"bytes"|"complex": ...}) so that the
    parent's == is Python's; numbers become int/float; anything else {"repr": ...}, equal to nothing."""
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    try:
        import numbers
        if isinstance(value, bool) or type(value).__name__ == "bool_":   # numpy's bool_ too
            return bool(value)
        if isinstance(value, numbers.Integral):
            value = int(value)
            return value if abs(value) < 10 ** 4000 else {"repr": "<int too large>"}
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, numbers.Complex):
            return {"complex": [float(value.real), float(value.imag)]}
    except Exception:
        return {"repr": "<unconvertible number>"}
    if depth > 50:
        return {"repr": "<nested too deep>"}
    for kind, types in (("list", list), ("tuple", tuple), ("set", (set, frozenset))):
        if isinstance(value, types):
            return {kind: [tagged(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[tagged(k, depth + 1), tagged(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    try:
        return {"repr": repr(value)[:1000]}
    except BaseException:
        return {"repr": f"<unprintable {type(value).__name__}>"}


def _left_side_value(test_code, ns):
    """For a failed `assert EXPR == EXPECTED`, the value EXPR gave (the debugger wants to see it)."""
    import ast
    try:
        tree = ast.parse(test_code)
        node = tree.body[0] if len(tree.body) == 1 else None
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
                and isinstance(node.test.ops[0], ast.Eq):
            value = eval(compile(ast.Expression(node.test.left), "<got>", "eval"), ns)
            return repr(value)[:500]
    except BaseException:
        pass
    return None


def _resolve(ns, name):
    fn = ns.get(name)
    if fn is None and isinstance(ns.get("Solution"), type):   # LeetCode-style `class Solution`
        fn = getattr(ns["Solution"](), name, None)
    if fn is None:
        raise NameError(f"the code does not define {name!r}")
    return fn


def run_functions(job):
    code, tests, per_test = job["code"], job["tests"], job["limits"]["test_timeout_s"]
    try:
        solution = compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        report({"syntax_error": f"{type(e).__name__}: {e}"})
        return 1
    signal.signal(signal.SIGALRM, _on_alarm)
    ns = {"__name__": "__solution__", "__builtins__": builtins}
    signal.setitimer(signal.ITIMER_REAL, per_test)
    try:
        exec("from typing import *", ns)   # as MapCoder's evaluator: `List[int]` without an import works
        exec(solution, ns)
        if job["setup_code"]:              # after the code: MBPP's setup builds objects of its classes
            exec(compile(job["setup_code"], "setup.py", "exec"), ns)
    except EOFError as e:   # a module-level input() with no stdin: fine if the function got defined
        if not (job["entry_point"] and job["entry_point"] in ns):
            report({"load_error": _tb_excerpt(e), "status": "error"})
            return 1
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        report({"load_error": _tb_excerpt(e), "status": _classify(e, None)})
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    current = [0]

    def expect(k, value):
        """An assert the parent took the expected value out of (eval/harness.py): report the value."""
        report({"i": current[0], "k": k, "got": tagged(value)})
    ns["__mcl_expect__"] = expect
    for i, test in enumerate(tests):
        test_file = f"<test {i}>"
        rec = {"i": i, "status": "ok"}
        current[0] = i
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            if test["kind"] == "call":
                fn = _resolve(ns, job["entry_point"])
                try:
                    rec["got"] = jsonable(fn(*test["input"]))
                except (TypeError, AttributeError):
                    if test.get("alt_input") is None:
                        raise
                    rec["got"] = jsonable(fn(*test["alt_input"]))
            else:
                exec(compile(test["code"], test_file, "exec"), ns)
                if test["kind"] == "check":
                    ns["check"](_resolve(ns, job["entry_point"]))
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec["status"] = _classify(e, test_file)
            rec["error"] = _tb_excerpt(e)
            if rec["status"] == "assert":
                signal.setitimer(signal.ITIMER_REAL, per_test)
                try:
                    rec["got"] = _left_side_value(test["code"], ns)
                except BaseException:
                    pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        report(rec)
        if rec["status"] == "timeout":   # a slow solution would be slow on every remaining test too
            break
    return 0


def run_program(job):
    try:
        program = compile(job["code"], "solution.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        report({"syntax_error": f"{type(e).__name__}: {e}"})
        return 1
    status = 0
    try:
        exec(program, {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"})
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        report({"status": "memory" if isinstance(e, MemoryError) else "error"})
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)   # from the program's frame on
        status = 1
    return status


def _oom_score(adj):
    """/proc/self/oom_score_adj (best effort: lowering it needs CAP_SYS_RESOURCE)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))
    except OSError:
        pass


def _install_seccomp(bpf):
    """Load the BPF program eval/sandbox.py compiled with libseccomp (see its _seccomp_bpf): one prctl,
    no library needed in the jail. Needs no_new_privs (set by _drop_privileges)."""
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def worker(job):
    """Set up, then run the untrusted code. Until the code starts, a failure is the jail's and goes to
    the supervisor's channel (still open here); from then on only RESULT_FD is left."""
    try:
        _oom_score(1000)
        _set_limits(job)
        _drop_privileges(job)
        if job["seccomp_bpf"]:
            _install_seccomp(job["seccomp_bpf"])
        _site(job)
    except BaseException as e:
        report({"setup_error": _tb_excerpt(e)}, SUPERVISOR_FD)
        os._exit(SETUP_FAILED)
    os.closerange(3, RESULT_FD)                  # the supervisor's channel among them
    os.closerange(RESULT_FD + 1, 1 << 16)
    _block_network()
    sys.argv = ["solution.py"]
    status = run_program(job) if job["driver"] == "program" else run_functions(job)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 1
    report({"done": True, "exit": status})
    os._exit(status)


def supervise(pid, job):
    t0 = time.monotonic()
    _, status, ru = os.wait4(pid, 0)
    rec = {"supervisor": True, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
           "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
           "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss, "wall_s": time.monotonic() - t0}
    report(rec, SUPERVISOR_FD)
    os._exit(0)   # in a pid namespace this kills everything else in it; in plain mode the parent
                  # kills the process group (the worker and its helpers stay in it)


def main():
    global RESULT_FD, SUPERVISOR_FD
    job_path, RESULT_FD, SUPERVISOR_FD = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(job_path, "rb") as f:
        job = marshal.load(f)   # written by eval/sandbox.py (trusted); marshal needs no imports
    try:
        for procs in job.get("cgroup_procs", ()):   # the run's cgroup: this process and all it starts
            with open(procs, "w") as f:
                f.write("0")
    except OSError as e:
        report({"setup_error": f"joining the run's cgroup: {e}"}, SUPERVISOR_FD)
        os._exit(SETUP_FAILED)
    _oom_score(-1000)                            # the OOM killer takes the program, not its supervisor
    if job["isolate_fs"]:
        try:
            _limit_ipc(job)
            isolate_filesystem(job)
        except OSError as e:
            report({"setup_error": f"isolate_filesystem: {e}"}, SUPERVISOR_FD)
            os._exit(SETUP_FAILED)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        try:
            worker(job)
        finally:
            os._exit(1)   # whatever escapes the worker: it never reaches the supervisor's code
    supervise(pid, job)


if __name__ == "__main__":
    main()
