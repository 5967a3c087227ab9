"""`mcl bench train` runs three modes (each in its own subprocess) on the tiny config and prints/writes the JSON it
promises, peak memory per mode included (timings are not asserted: the machine is shared).

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
    assert [r["mode"] for r in last["rows"]] == ["ours_fp32", "single", "peft_fp32"]
    assert all(r["tok_s"] > 0 for r in last["rows"])
    assert all(r["peak_gb"] >= r["load_peak_gb"] > 0 for r in last["rows"])   # each mode's own process
    assert last["ratios"]["ours_fp32_vs_single"] > 0 and last["cpu_ratios"]["ours_fp32_vs_peft_fp32"] > 0
    assert last["model"] == "tiny"
    assert json.loads((out / "train_tiny_cpu.json").read_text()) == last
