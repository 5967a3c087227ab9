"""Helpers shared by the benchmark commands (bench/*.py): the device's name for the JSON, writing the JSON, and
setting an environment variable for a block.

    from bench.common import device_name, env_var, isa, write_result
    result = {"bench": "...", "device": device_name("cpu"), **isa(), "rows": rows}   # isa(): cpu_model, cpu_flags
    write_result(result, args.out, "name_cpu.json")

Every result records the CPU it ran on (kernels/cpu_info.py's isa(): the model name and its AVX2 / AVX-512 / VNNI /
AMX flags), so numbers from different machines are never compared unknowingly; write_result refuses one without.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import torch

from kernels.cpu_info import isa


def device_name(device: str) -> str:
    """'NVIDIA H100 ...' on CUDA; 'cpu: <processor>, <n> threads' on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_result(result: dict, out: str | None, default_name: str) -> None:
    """Write `result` as indented JSON to `out`: a file path, or a directory (existing, or ending in '/') in which
    the file is called `default_name`. Nothing when `out` is empty. ValueError when `result` lacks **isa()."""
    missing = [k for k in isa() if k not in result]
    if missing:
        raise ValueError(f"bench/common.py write_result({default_name}): no {', '.join(missing)} in the result "
                         "(add **isa() from kernels/cpu_info.py)")
    if not out:
        return
    p = Path(out)
    if out.endswith("/") or p.is_dir():
        p.mkdir(parents=True, exist_ok=True)
        p = p / default_name
    p.write_text(json.dumps(result, indent=2) + "\n")


@contextlib.contextmanager
def env_var(name: str, value: str):
    """os.environ[name] = value inside the block, the previous value (or its absence) after it."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
