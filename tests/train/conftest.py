"""tests/train: make tiny_setup importable, keep W&B quiet, and train on one thread (the shapes are small and
the CI machine's 2 cores are shared; oversubscribed OpenMP threads spin and can slow a step tenfold)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
