"""Helpers shared by the benchmark commands (bench/*.py): the device's name for the JSON, and writing the JSON.

    from bench.common import device_name, isa, write_result
    result = {"bench": "...", "device": device_name("cpu"), **isa(), "rows": rows}   # isa(): cpu_model, cpu_flags
    write_result(result, args.out, "name_cpu.json")

Every result records the CPU it ran on (kernels/cpu_info.py's isa(): the model name and its AVX2 / AVX-512 / VNNI /
AMX flags), so numbers from different machines are never compared unknowingly; write_result refuses one without.
"""
from __future__ import annotations

import json
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
