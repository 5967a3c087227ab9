"""`mcl bench train` runs all three modes on the tiny config and prints/writes the JSON it promises (timings are
not asserted: the machine is shared).

    python -m pytest tests/train/test_bench_train.py -q
"""
import argparse
import json

import pytest

pytest.importorskip("peft")


def test_bench_train_quick_tiny(tmp_path, capsys):
    from bench.train import main
    out = tmp_path / "results"
    main(argparse.Namespace(json=True, out=str(out) + "/", model="tiny", device="cpu", quick=True))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["mode"] for r in last["rows"]] == ["mixed4", "single", "hf_peft_sequential"]
    assert all(r["tok_s"] > 0 for r in last["rows"])
    assert last["mixed_vs_single"] > 0 and last["mixed_vs_hf_peft"] > 0 and last["model"] == "tiny"
    assert json.loads((out / "train_tiny_cpu.json").read_text()) == last
