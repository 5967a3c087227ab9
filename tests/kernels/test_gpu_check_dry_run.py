"""`bash scripts/gpu_check.sh --dry-run`: the GPU loan's script runs every stage on the CPU (interpreter, tiny shapes)
and leaves its files and summary the way the GPU run will, so a loan is not spent finding a typo.

    python -m pytest tests/kernels/test_gpu_check_dry_run.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["versions_ceilings", "kernel_tests", "big_shape_checks", "bench_lora", "profile", "bench_train",
          "bench_serve"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in; on a GPU run the script itself")
def test_gpu_check_dry_run(tmp_path):
    # The script calls `python3`: the interpreter running this test first on PATH, as in an activated venv.
    env = dict(os.environ, OUT=str(tmp_path), PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(status) == STAGES and set(status.values()) == {"ok"}, f"{status}\n{r.stdout[-4000:]}"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert {"gpu_check.log", "summary.json", "ceilings.json", "lora.json", "profile_q_proj.json"} <= set(files)
    assert summary["kernel_tests"].startswith("1 passed"), summary["kernel_tests"]
    assert "skipped" in summary["big_shape_checks"]                   # the 7B checks need CUDA
    assert summary["ceilings"]["copy_gbs"] > 0 and summary["lora_complete"]
    assert len(summary["lora_block"]) == 6 and summary["profile_top"]
    tail = r.stdout.strip().splitlines()
    table = tail.index(next(line for line in tail if line.startswith("== gpu_check summary")))
    assert tail[table + 1].split() == ["stage", "status", "secs", "limit"] and tail[-1].startswith("files:")
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"== {s} (timeout" in log for s in STAGES)
