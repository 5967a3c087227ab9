"""Shared pytest setup. On machines without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before anything imports triton (triton.jit reads it when a kernel is decorated), so it is set here, first.

    python -m pytest tests -q
"""
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:                      # torch-free tests still run
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
