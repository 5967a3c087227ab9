"""One cgroup per sandbox run: a bound on the memory and the number of processes of the whole run.

    from eval.sandbox_cgroup import RunCgroup
    cg = RunCgroup.create("mcl-sandbox-abc", memory_bytes=512 << 20, pids=40)   # None where the kernel gives none
    job["cgroup_procs"] = cg.procs_files      # eval/sandbox_child.py writes its own pid there before the jail
    ...                                       # the run
    cg.oom_killed(); cg.close()               # did the kernel kill for memory? kill what is left, remove it

RLIMIT_AS bounds one process's address space; a program that forks (RLIMIT_NPROC children, each with its own
RLIMIT_AS) or keeps data in memfd_create files (counted by no rlimit and no tmpfs size) escapes it. A memory
cgroup counts all of it (anonymous memory, tmpfs and memfd pages, page cache) for every process of the run, and
the kernel OOM-kills inside the run when it is over. Used where the kernel gives one to this process as root:
cgroup v2 (memory.max, memory.swap.max, pids.max; the controllers must be enabled, or enable-able, below our own
cgroup) or v1 hierarchies with the memory and pids controllers (memory.limit_in_bytes, memsw where swap
accounting is on, pids.max). `available()` says whether it works here (probed once by creating one).
"""
from __future__ import annotations

import os
import signal
import threading
import time

_probe: bool | None = None
_probe_lock = threading.Lock()


def _mounts() -> dict[str, tuple[str, str]]:
    """{controller: (mount point, mount root)} for the cgroup v1 hierarchies, and 'v2' for the cgroup2 one."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, fs = pre.split(), post.split()
                if len(fields) < 5 or len(fs) < 3:
                    continue
                if fs[0] == "cgroup2":
                    out.setdefault("v2", (fields[4], fields[3]))
                elif fs[0] == "cgroup":
                    for opt in fs[2].split(","):
                        if opt in ("memory", "pids"):
                            out.setdefault(opt, (fields[4], fields[3]))
    except OSError:
        pass
    return out


def _own(kind: str, mount: tuple[str, str]) -> str:
    """This process's cgroup directory in a hierarchy (kind: 'v2' or a v1 controller); the mount point when
    /proc/self/cgroup names a path that the mount does not show (a namespaced view)."""
    point, root = mount
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if (kind == "v2" and ctrls == "") or kind in ctrls.split(","):
                    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
                    d = os.path.normpath(os.path.join(point, rel))
                    return d if os.path.isdir(d) else point
    except (OSError, ValueError):
        pass
    return point


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class RunCgroup:
    """The directories of one run's cgroup (one for v2; one per controller for v1)."""

    def __init__(self, dirs: list[str], oom_file: str):
        self.dirs, self.oom_file = dirs, oom_file

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids: int) -> "RunCgroup | None":
        """A fresh cgroup `name` with the two limits, or None where this process cannot make one."""
        if os.geteuid() != 0:
            return None
        mounts = _mounts()
        made: list[str] = []
        try:
            if "v2" in mounts:
                base = _own("v2", mounts["v2"])
                have = open(os.path.join(base, "cgroup.controllers")).read().split()
                if "memory" in have and "pids" in have:
                    d = os.path.join(base, name)
                    os.mkdir(d, 0o700)
                    made.append(d)
                    if not os.path.exists(os.path.join(d, "memory.max")):
                        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
                    _write(os.path.join(d, "memory.max"), memory_bytes)
                    _write(os.path.join(d, "pids.max"), pids)
                    try:
                        _write(os.path.join(d, "memory.swap.max"), 0)
                    except OSError:
                        pass
                    return cls(made, os.path.join(d, "memory.events"))
            if "memory" in mounts and "pids" in mounts:
                mem = os.path.join(_own("memory", mounts["memory"]), name)
                os.mkdir(mem, 0o700)
                made.append(mem)
                pid = os.path.join(_own("pids", mounts["pids"]), name)
                os.mkdir(pid, 0o700)
                made.append(pid)
                _write(os.path.join(mem, "memory.limit_in_bytes"), memory_bytes)
                try:
                    _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), memory_bytes)
                except OSError:
                    pass                                 # no swap accounting (or no swap): nothing to cap
                _write(os.path.join(pid, "pids.max"), pids)
                return cls(made, os.path.join(mem, "memory.oom_control"))
        except (OSError, ValueError):
            pass
        cls(made, "").close()
        return None

    def oom_killed(self) -> bool:
        """Did the kernel kill a process of this run for going over the memory limit?"""
        try:
            with open(self.oom_file) as f:
                return any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in f)
        except (OSError, ValueError, IndexError):
            return False

    def close(self) -> None:
        """SIGKILL every process still in the cgroup (escapees of plain mode included), then remove it."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    pids = [int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()]
                except (OSError, ValueError):
                    pids = []
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)                     # the killed are still exiting


def available() -> bool:
    """Can this process bound a run with a cgroup? (probed once: create one and remove it)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            cg = RunCgroup.create(f"mcl-sandbox-probe-{os.getpid()}", 64 << 20, 8)
            _probe = cg is not None
            if cg is not None:
                cg.close()
        return _probe
