"""The end-to-end recipe: distill -> correct -> mutate -> build the SFT file -> train the four adapters -> evaluate.

    python -m recipes.e2e recipes/mini_e2e.toml                        # the miniature (CPU, hours)
    python -m recipes.e2e recipes/mini_e2e.toml distill.n_problems=5 main.limit=2   # table.key=value overrides
    python -m recipes.e2e recipes/paper_e2e.toml distill.teacher_url=http://HOST:8000 ...

Each stage is the same code as its command (mcl distill, mcl correct, mcl mutate, python -m recipes.build_sft,
mcl main) and keeps its own resumable state under its out= directory, so rerunning after a kill continues where
it stopped. Tables of the recipe: [distill] [correct] [mutate] [build] [main] (see recipes/mini_e2e.toml); a
recipe without a [mutate] table skips that stage. When [mutate] names student_trajectories, the student
(main.student) first runs distill itself on the same problems, into that file's directory (resumable too):
its debugger calls become the "student_repair" examples (recipes/mutate.py).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from recipes.build_sft import build_sft
from recipes.correct import CorrectConfig, correct
from recipes.common import has_table, load_config
from recipes.distill import DistillConfig, distill, print_stats
from recipes.main_job import MainConfig, main_job
from recipes.mutate import MutateConfig, mutate


@dataclass
class BuildConfig:
    out: str = ""                        # the merged SFT file ("" = main.data)


def run_e2e(recipe: str, overrides=()) -> dict:
    tables = ("distill", "correct", "mutate", "build", "main")
    for ov in overrides:
        if ov.split(".", 1)[0] not in tables or "=" not in ov:
            raise ValueError(f"override {ov!r}: expected table.key=value with table in {', '.join(tables)}")
    ovs = {t: [o for o in overrides if o.startswith(t + ".")] for t in tables}
    dcfg = load_config(DistillConfig, recipe, "distill", ovs["distill"])
    ccfg = load_config(CorrectConfig, recipe, "correct", ovs["correct"])
    mcfg = load_config(MainConfig, recipe, "main", ovs["main"])
    mutcfg = load_config(MutateConfig, recipe, "mutate", ovs["mutate"]) if has_table(recipe, "mutate") else None
    bcfg = load_config(BuildConfig, recipe, "build", ovs["build"])
    sft = bcfg.out or mcfg.data

    print(f"e2e [1/5] distill: {dcfg.teacher_url or dcfg.teacher} over {dcfg.benchmark}/{dcfg.split}", flush=True)
    print_stats(distill(dcfg), dcfg.out)
    print("e2e [2/5] correct the failed trajectories", flush=True)
    cs = correct(ccfg)
    print(f"correct: {cs['attempted']} attempted, blame {cs['blame']}, {cs['successes']} corrected", flush=True)
    if mutcfg is not None:
        if mutcfg.student_trajectories:
            scfg = dataclasses.replace(dcfg, teacher=mcfg.student, teacher_url="", teacher_model="",
                                       format_only_roles=[], out=str(Path(mutcfg.student_trajectories).parent))
            print(f"e2e [3/5] the student {mcfg.student} runs the same problems (its own failing programs)", flush=True)
            distill(scfg)
        print("e2e [3/5] mutate the passing programs into debugger examples", flush=True)
        ms = mutate(mutcfg)
        extra = f", {ms['student_repair']['examples']} student repairs" if ms["student_repair"] else ""
        print(f"mutate: {ms['examples']['debugger']} debugger examples ({ms['mutants']} mutants of "
              f"{ms['programs_mutated']} programs{extra})", flush=True)
    print(f"e2e [4/5] build {sft}", flush=True)
    prov = build_sft(dcfg.out, ccfg.out, sft, note=f"python -m recipes.e2e {recipe} {' '.join(overrides)}".strip(),
                     mutate_dir=mutcfg.out if mutcfg else None)
    print(f"build_sft: {prov['examples']}", flush=True)
    mcfg.data = sft
    print("e2e [5/5] train + evaluate", flush=True)
    return main_job(mcfg)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    run_e2e(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
