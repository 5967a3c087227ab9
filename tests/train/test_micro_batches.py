"""engine/training/trainer.py micro_batches: grouping the global batch by length partitions the same examples (so the step's
gradient is the same sum), pads less, deals micro-batches to ranks so that W ranks together hold the one-process
micro-batches, and the ungrouped mode keeps contiguous per-rank blocks.

    python -m pytest tests/train/test_micro_batches.py -q
"""
import random

from engine.training.data import Example
from engine.training.trainer import micro_batches


def _examples(n, seed=0):
    rng = random.Random(seed)
    return [Example(role_id=i % 4, ids=list(range(rng.randint(20, 900))), mask=[0, 1] * 450, where=f"test:{i}")
            for i in range(n)]


def _padded(mbs):
    return sum(len(mb) * max(len(e.ids) for e in mb) for mb in mbs)


def test_grouped_micro_batches_partition_the_batch_and_pad_less():
    ex = _examples(64)
    for world in (1, 2, 4):
        for by_length in (True, False):
            per_rank = [micro_batches(ex, 4, r, world, by_length) for r in range(world)]
            got = [id(e) for mbs in per_rank for mb in mbs for e in mb]
            assert sorted(got) == sorted(id(e) for e in ex), (world, by_length)    # each example exactly once
            assert all(len(mbs) == 64 // (4 * world) and all(len(mb) == 4 for mb in mbs) for mbs in per_rank)
    one = micro_batches(ex, 4, 0, 1, True)
    dealt = [micro_batches(ex, 4, r, 2, True) for r in range(2)]
    assert [mb for pair in zip(*dealt) for mb in pair] == one                       # rank r: every W-th of one's
    plain = micro_batches(ex, 4, 0, 1, False)
    assert plain == [ex[i:i + 4] for i in range(0, 64, 4)]
    assert micro_batches(ex, 4, 1, 2, False) == [ex[32 + i:36 + i] for i in range(0, 32, 4)]
    real = sum(len(e.ids) for e in ex)
    assert _padded(one) - real < 0.5 * (_padded(plain) - real), (_padded(one), _padded(plain), real)   # pad tokens
