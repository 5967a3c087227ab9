"""Keep freed memory in the process's heap, so that large CPU temporaries are not page-faulted in again each time.

    from engine.cpu.heap import keep_freed_memory
    keep_freed_memory()        # once per process; engine/loading/hub.load_model calls it for CPU inference weights

torch allocates CPU tensors with malloc and frees them at once. glibc serves blocks above its mmap threshold with a
fresh mmap and gives them back to the kernel when freed (and trims the heap's top above its trim threshold), so a
prefill's 10-40 MB activations (a 512-token chunk: gate|up alone is 20 MB on the 0.5B, 37 MB on the 1.5B) are zeroed
and faulted in page by page at every layer: ~0.3 s of a 1.7 s 512-token prefill of Qwen2.5-Coder-0.5B on 2 cores.
mallopt with the largest mmap threshold glibc takes (32 MiB on 64-bit) and a trim threshold of 2 GiB keeps those
blocks for reuse; peak RSS is the peak either way (the process keeps it afterwards). Elsewhere (musl, macOS) this
does nothing. We call glibc through ctypes rather than set MALLOC_* variables because those only count at start-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20                            # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set both thresholds (once per process); False where the C library is not glibc or refuses them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
