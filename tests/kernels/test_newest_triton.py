"""The kernel tests once more under the newest triton release on PyPI, which a user without our constraints gets.

The suite runs under the triton pinned in constraints.txt. A new triton release can break the kernels for every fresh
`pip install` while the pinned suite stays green (triton 3.9.0's interpreter did exactly that). This test asks pip for
the newest release; if it is the installed one, it skips saying so (the rest of the suite already covers it). Otherwise
it installs that release into a temporary directory (`pip install --no-deps --target`, nothing in the environment
changes), reruns tests/kernels there in a subprocess, and fails with one named line: which triton version breaks which
tests. Without network access it skips with the reason.

    python -m pytest tests/kernels/test_newest_triton.py -q -rs
    python -m pytest -m "not newest_triton"          # the suite without this check
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.newest_triton


def _pip(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _newest_triton() -> str:
    r = _pip("index", "versions", "triton", "--disable-pip-version-check", timeout=120)
    m = re.search(r"^triton \(([^)]+)\)", r.stdout, re.M)
    if r.returncode != 0 or not m:
        pytest.skip(f"cannot ask PyPI for the newest triton: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return m.group(1)


def test_kernels_under_newest_triton(tmp_path):
    triton = pytest.importorskip("triton")
    newest = _newest_triton()
    if newest == triton.__version__:
        pytest.skip(f"triton {newest} is both the newest release and the installed one: the suite covers it")
    r = _pip("install", "-q", "--no-deps", "--target", str(tmp_path / "site"), f"triton=={newest}")
    if r.returncode != 0:
        pytest.skip(f"cannot install triton {newest}: {r.stderr.strip().splitlines()[-1:]}")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
           "-m", "not newest_triton and not gpu", "-x", "--no-header"]
    probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == newest, f"the subprocess imports triton {probe.stdout.strip()}, not {newest}"
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    assert p.returncode == 0, (f"kernel tests fail under the newest triton {newest} (pinned {triton.__version__}): "
                               f"{'; '.join(failed) or p.stdout[-2000:]}")
