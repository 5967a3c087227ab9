"""Merge the examples of `mcl distill`, `mcl correct` and `mcl mutate` into one role-tagged SFT file + PROVENANCE.json.

    python -m recipes.build_sft --distill runs/distill --correct runs/correct --mutate runs/mutate \
        --out recipes/data/mini_sft.jsonl

    from recipes.build_sft import build_sft
    prov = build_sft("runs/distill", "runs/correct", "recipes/data/mini_sft.jsonl", mutate_dir="runs/mutate")

The output is the trainer's format (engine/training/data.py), one example per line, distilled examples first (in
problem order), then corrected ones, then the mutation stage's debugger examples; exact duplicates (same role
and messages) are dropped. Each line keeps its "source" (origin distill|correct|mutation|student_repair, problem id, agent
step), which the trainer ignores.

PROVENANCE.json (beside the output) is assembled from what the stages recorded themselves (their
OUT/config.json and OUT/stats.json), never typed by hand: the teacher and supervisor, every command that
ran with its date and git commit, the seed and settings, the acceptance rule, the per-role counts and the
rejection reasons, and the sha256 of the output file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

from engine.roles import ROLES
from recipes.common import dedup, run_record, write_examples
from recipes.distill import teacher_name

ACCEPT_RULES = {
    "hidden": "examples come from trajectories whose final program passes every test of the problem "
              "(MBPP: all three asserts); retriever/planner/coder calls on the passing path with format-valid "
              "answers, debugger calls that turned a failing program into the passing one",
    "samples": "WEAKER FILTER: examples come from trajectories whose final program passes the problem's SAMPLE "
               "tests (MBPP: the first assert) -- it may still fail the other tests; format-valid calls on the "
               "passing path only",
}


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _stage(d: Path | None) -> tuple[dict, dict, list[dict]]:
    if d is None:
        return {}, {}, []
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: not found (is {d} the out= of a distill/correct run?)")
    return json.loads(cfg.read_text()), json.loads((d / "stats.json").read_text()), _read(d / "examples.jsonl")


def build_sft(distill_dir, correct_dir=None, out="recipes/data/mini_sft.jsonl", note: str = "",
              mutate_dir=None) -> dict:
    """Write `out` and PROVENANCE.json beside it; return the provenance dict."""
    d_meta, d_stats, d_ex = _stage(Path(distill_dir))
    c_meta, c_stats, c_ex = _stage(Path(correct_dir)) if correct_dir else ({}, {}, [])
    m_meta, m_stats, m_ex = _stage(Path(mutate_dir)) if mutate_dir else ({}, {}, [])
    rejected = Counter()
    examples = dedup(d_ex + c_ex + m_ex, rejected)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_examples(out, examples)
    per_role = Counter(e["role"] for e in examples)
    per_origin = Counter((e["source"]["origin"], e["role"]) for e in examples)
    dc = d_meta.get("config", {})
    cc = c_meta.get("config", {})
    from types import SimpleNamespace
    prov = {
        "file": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "examples": {r: per_role[r] for r in ROLES},
        "examples_total": len(examples),
        "by_origin": {o: {r: per_origin[o, r] for r in ROLES} for o in ("distill", "correct", "mutation", "student_repair")},
        "duplicates_dropped": sum(rejected.values()),
        "teacher": teacher_name(SimpleNamespace(**dc)) if dc else "",
        "supervisor": (teacher_name(SimpleNamespace(teacher=cc.get("supervisor"), teacher_url=cc.get("supervisor_url"),
                                                    teacher_model=cc.get("supervisor_model"))) if cc else None),
        "decoding": "greedy (temperature 0)",
        "seed": dc.get("seed"),
        "accept": dc.get("accept"),
        "accept_rule": ACCEPT_RULES.get(dc.get("accept"), ""),
        "format_only_tier": {"examples": d_stats.get("format_only", {}), "rule": d_stats.get("format_only_rule", "")},
        "edited": {"examples": d_stats.get("edited", {}), "rule": d_stats.get("edit_rule", "")},
        "distill": {"settings": dc, "runs": d_meta.get("runs", []), "stats": d_stats},
        "correct": {"settings": cc, "runs": c_meta.get("runs", []), "stats": c_stats} if cc else None,
        "student_repair": (m_stats or {}).get("student_repair"),
        "mutation": ({"rule": m_stats.get("rule", ""), "settings": m_meta.get("config", {}),
                      "runs": m_meta.get("runs", []), "stats": m_stats} if m_meta else None),
        "build": run_record(),
        "note": note,
    }
    (out.parent / "PROVENANCE.json").write_text(json.dumps(prov, indent=2) + "\n")
    return prov


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distill", required=True, help="out= directory of `mcl distill`")
    ap.add_argument("--correct", default=None, help="out= directory of `mcl correct`")
    ap.add_argument("--mutate", default=None, help="out= directory of `mcl mutate`")
    ap.add_argument("--out", default="recipes/data/mini_sft.jsonl")
    ap.add_argument("--note", default="", help="a free-text remark stored in PROVENANCE.json")
    a = ap.parse_args(argv)
    prov = build_sft(a.distill, a.correct, a.out, a.note, mutate_dir=a.mutate)
    print(f"build_sft: {prov['examples_total']} examples ({', '.join(f'{r} {n}' for r, n in prov['examples'].items())})"
          f" -> {a.out} + {Path(a.out).parent / 'PROVENANCE.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
