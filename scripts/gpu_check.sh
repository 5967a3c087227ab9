#!/usr/bin/env bash
# The one command for a GPU machine: every GPU measurement (kernels/bench.py's goals too) in one run of <= 9 min.
#
#   OUT=/some/dir bash scripts/gpu_check.sh             # on the GPU machine (torch + triton + transformers + peft)
#   OUT=/tmp/x bash scripts/gpu_check.sh --dry-run      # the same stages on the CPU: interpreter, tiny shapes
#
# Runs from the tree (PYTHONPATH, nothing installed, no network, no wandb/gguf needed). Each stage runs under its own
# `timeout`; a failed or timed-out stage is recorded and the next one still runs. Files under $OUT (7):
#   gpu_check.log          every stage's output, in order
#   ceilings.json          versions + measured device-to-device copy GB/s and cuBLAS bf16 GEMM TFLOP/s
#   lora.json              `mcl bench lora` rows (incl. the all-ids -1 row), roofline columns, block totals, goals
#   profile_q_proj.json    torch.profiler per-kernel table, q_proj at T=8192 and T=64
#   train.json, serve.json `mcl bench train` / `mcl bench serve` at 7B shapes, random weights on the device
#   summary.json           stage status + seconds, versions, ceilings, block totals, goals: commit it under
#                          bench/results/
# A short table is printed last (pytest takes -q from pytest.ini). Stages (GPU run; the dry run shrinks each):
#   1 versions + ceilings    python -m kernels.bench --ceilings
#   2 kernel tests           pytest tests/kernels (compiled on the GPU, one autotune config each: MCL_AUTOTUNE=0)
#   3 big-shape checks       pytest -m gpu tests/kernels (bf16/fp16 at 7B shapes vs fp32; CUDA-graph decode step)
#   4 bench lora             python -m kernels.bench --quick (T 64/512/8192; mixes even/skewed/base_only)
#   5 profile                python -m kernels.bench --profile
#   6 bench train            python -m engine.cli bench train  (the mcl entry point; resolves bench/ wherever it is)
#   7 bench serve            python -m engine.cli bench serve
# The dry run (part of the test suite: tests/kernels/test_gpu_check_dry_run.py) runs stages 1-5 for real on tiny
# shapes and, for 6-7, resolves the exact command line to its module and imports it (their CPU runs take minutes
# on a shared machine and have their own tests); DRY_FULL=1 runs 6-7 for real on CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"          # 9 minutes for everything
T0=$(date +%s)
STAGES="$(mktemp)"                           # name \t rc \t seconds \t limit (kept out of $OUT: <= 8 files there)
trap 'rm -f "$STAGES"' EXIT

if (( DRY )); then
  export TRITON_INTERPRET=1
  DEV=cpu
else
  unset TRITON_INTERPRET
  DEV=cuda
fi

stage() {  # stage NAME LIMIT_S CMD...: run under timeout (cut to what is left of the budget), tee into the log
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - 5 ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "== $name: skipped, budget spent ==" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >> "$STAGES"
    return
  fi
  echo "== $name (timeout ${limit}s): $(echo "$*" | tr '\n' ' ' | cut -c1-240) ==" | tee -a "$LOG"
  local s=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" "$limit" >> "$STAGES"
}

# The dry run's stand-in for a long bench: parse the real command line with mcl's parser, import its target.
RESOLVE_PY='
import importlib, sys
from engine.cli import build_parser
args = build_parser().parse_args(sys.argv[1:])
target = next(c.cell_contents for c in args.func.__closure__ if isinstance(c.cell_contents, str))
mod, fn = target.split(":")
assert callable(getattr(importlib.import_module(mod), fn)), target
print(" ".join(sys.argv[1:]), "->", target, ": importable (dry run: not run)")
'

if (( DRY )); then
  stage versions_ceilings 60 "$PY" -m kernels.bench --ceilings --json --device cpu --out "$OUT/ceilings.json"
  stage kernel_tests 120 "$PY" -m pytest -p no:cacheprovider \
    "tests/kernels/test_multi_lora.py::test_matches_reference[T1-triton-dtype0]"
  stage big_shape_checks 60 "$PY" -m pytest -p no:cacheprovider -m gpu tests/kernels/test_gpu_7b.py
  stage bench_lora 120 "$PY" -m kernels.bench --quick --json --device cpu --out "$OUT/lora.json"
  stage profile 120 "$PY" -m kernels.bench --profile --device cpu --out "$OUT"
  if [[ "${DRY_FULL:-0}" == 1 ]]; then
    stage bench_train 600 "$PY" -m engine.cli bench train --quick --json --device cpu --model tiny --out "$OUT/train.json"
    stage bench_serve 600 "$PY" -m engine.cli bench serve --quick --json --device cpu --out "$OUT/serve.json"
  else
    stage bench_train 60 "$PY" -c "$RESOLVE_PY" bench train --quick --json --device cpu --model tiny --out "$OUT/train.json"
    stage bench_serve 60 "$PY" -c "$RESOLVE_PY" bench serve --quick --json --device cpu --out "$OUT/serve.json"
  fi
else
  stage versions_ceilings 30 "$PY" -m kernels.bench --ceilings --json --device cuda --out "$OUT/ceilings.json"
  stage kernel_tests 75 env MCL_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider tests/kernels -m "not gpu" \
    --ignore=tests/kernels/test_compile_sm90.py --ignore=tests/kernels/test_gpu_check_dry_run.py \
    --ignore=tests/kernels/test_newest_triton.py
  stage big_shape_checks 75 env MCL_AUTOTUNE=0 "$PY" -m pytest -p no:cacheprovider -m gpu tests/kernels
  stage bench_lora 200 "$PY" -m kernels.bench --quick --json --device cuda --out "$OUT/lora.json"
  stage profile 40 "$PY" -m kernels.bench --profile --device cuda --out "$OUT"
  stage bench_train 55 "$PY" -m engine.cli bench train --quick --json --device cuda --model qwen2.5-7b-instruct \
    --out "$OUT/train.json"
  stage bench_serve 55 "$PY" -m engine.cli bench serve --quick --json --device cuda --model qwen2.5-7b-instruct \
    --out "$OUT/serve.json"
fi

# summary.json + the short table, printed last.
"$PY" - "$OUT" "$STAGES" "$DRY" "$(( $(date +%s) - T0 ))" <<'EOF' 2>&1 | tee -a "$LOG"
import json, re, sys
from pathlib import Path
out, stages_file, dry, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
log = (out / "gpu_check.log").read_text(errors="replace")
stages = []
for line in Path(stages_file).read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    status = "skipped" if rc == "skipped" else "ok" if rc == "0" else "timeout" if rc in ("124", "137") else f"rc={rc}"
    stages.append({"stage": name, "status": status, "seconds": int(secs), "limit_s": int(limit)})
def pytest_line(after):
    part = log.split(f"== {after} ", 1)[-1]
    m = re.search(r"^=*\s*(\d+ (?:passed|failed|skipped|error)[^\n]*?)\s*=*$", part, re.M)
    return m.group(1) if m else None
ceil, lora, prof, train, serve = (load(n) for n in ("ceilings.json", "lora.json", "profile_q_proj.json",
                                                    "train.json", "serve.json"))
summary = {
    "check": "scripts/gpu_check.sh" + (" --dry-run" if dry else ""), "total_s": total, "stages": stages,
    "versions": {k: ceil.get(k) for k in ("torch", "triton", "cuda", "python", "device")} if ceil else None,
    "ceilings": {k: ceil.get(k) for k in ("copy_gbs", "gemm_tflops", "dtype", "gemm_shape")} if ceil else None,
    "kernel_tests": pytest_line("kernel_tests"), "big_shape_checks": pytest_line("big_shape_checks"),
    "lora_complete": lora.get("complete") if lora else None,
    "lora_block": lora.get("block") if lora else None, "goals": lora.get("goals") if lora else None,
    "profile_top": {T: rows[:8] for T, rows in prof["tables"].items()} if prof else None,
    "train": {k: train.get(k) for k in ("rows", "mixed_vs_single", "mixed_vs_hf_peft")} if train else None,
    "serve": serve,
    "gpu_goals_note": "unmeasured (dry run on CPU)" if dry else "see goals",
}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("\n== gpu_check summary" + (" (DRY RUN: CPU, tiny shapes)" if dry else "") + f": {total}s total ==")
print(f"{'stage':20s} {'status':9s} {'secs':>5s} {'limit':>5s}")
for s in stages:
    print(f"{s['stage']:20s} {s['status']:9s} {s['seconds']:5d} {s['limit_s']:5d}")
if ceil:
    print(f"device {ceil.get('device')}  torch {ceil.get('torch')}  triton {ceil.get('triton')}  "
          f"copy {ceil.get('copy_gbs')} GB/s  gemm {ceil.get('gemm_tflops')} TFLOP/s")
print(f"kernel tests: {summary['kernel_tests']}   big-shape checks: {summary['big_shape_checks']}")
for b in (lora or {}).get("block", []):
    if b["mix"] != "skewed":
        print(f"block T={b['T']:<5d} {b['mix']:9s} {b['pass']:7s} ours/base {b['ours_vs_base']}  "
              f"peft/ours {b['peft_loop_vs_ours']}")
for g in (lora or {}).get("goals", []):
    print(f"goal {g['status']:10s} {g['goal']} (worst {g['worst']})")
print(f"files: {sorted(p.name for p in out.iterdir())}")
EOF
