"""`mcl`: the command line. Each subcommand parses its flags here and calls one function in the
module that owns the work (imported lazily, so `mcl --help` is instant).

    mcl generate --model smollm2-135m --prompt "def fib(n):" --max-new-tokens 64
    mcl chat --model smollm2-135m
    mcl convert model.gguf out_dir/
    mcl export --gguf ADAPTER_DIR OUT.gguf [--model smollm2-135m]
    mcl bench generate|lora|train|serve|agents|mapcoder --json
    mcl serve --model smollm2-135m --adapters runs/adapters --port 8000    # OpenAI-compatible, loopback
    mcl train recipes/mini_smollm2.toml key=value ...
    mcl eval --benchmark humaneval --strategy mapcoder --limit 10 --out runs/eval
    mcl report runs/eval_base runs/eval_adapted
    mcl distill ... / mcl correct ... / mcl mutate ... / mcl main
    mcl miniature run|status|gate|sft           # the miniature campaign (recipes/miniature.py)
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _call(target: str, kwargs=None):
    """'module:function' -> a handler that imports the module only when the subcommand runs. With `kwargs`
    (args -> dict) the function gets explicit keyword arguments; without, the parsed args (the commands whose
    modules still take them: generate, chat, convert, export, train, bench)."""
    def run(args):
        mod, fn = target.split(":")
        f = getattr(importlib.import_module(mod), fn)
        return f(**kwargs(args)) if kwargs else f(args)
    return run


def _overrides(rest) -> list[str]:
    """key=value words after a subcommand (argparse.REMAINDER keeps a leading `--`)."""
    return [a for a in rest or [] if a != "--"]


def _model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, qwen2.5-coder-0.5b), an HF directory or a .gguf file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "q4"],
                   help="CPU inference weights: fp32 (exact), bf16, or q4 (a GGUF's quantised blocks kept as they are, every "
                        "type the embedded models use: Q4_0/1, Q4_K, Q5_0, Q6_K, Q8_0); "
                        "see engine/loading/packed_model.py")
    p.add_argument("--eager-decode", action="store_true",
                   help="q4 only: run decode steps through the eager torch path (the reference) instead of one C call "
                        "per layer (engine/cpu/decode_step.py)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcl", description="mapcoder-lite: one small LLM, four role adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming")
    _model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--adapters", default=None, help="directory of PEFT adapters (one subdirectory per role)")
    p.add_argument("--adapter", default=None, help="role adapter to apply")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_call("engine.serving.generate:cli_generate"))

    p = sub.add_parser("chat", help="interactive conversation")
    _model_flags(p)
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=_call("engine.serving.generate:cli_chat"))

    p = sub.add_parser("convert", help="GGUF file -> HF-format directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("gguf")
    p.add_argument("outdir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of model.safetensors (the GGUF is dequantised to float32 first)")
    p.set_defaults(func=_call("engine.loading.weights:cli_convert"))

    p = sub.add_parser("export", help="PEFT adapter -> llama.cpp's GGUF LoRA adapter file")
    p.add_argument("--gguf", nargs=2, required=True, metavar=("ADAPTER_DIR", "OUT.gguf"))
    p.add_argument("--model", default="smollm2-135m", help="the base GGUF (embedded name or .gguf file)")
    p.set_defaults(func=_call("engine.loading.export_gguf:cli_export"))

    p = sub.add_parser("bench", help="side-by-side benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, target in [("generate", "bench.generate:main"), ("lora", "kernels.bench:main"),
                         ("train", "bench.train:main"), ("serve", "bench.serve:main"),
                         ("agents", "bench.agents:main"), ("mapcoder", "bench.mapcoder:main")]:
        b = bsub.add_parser(name)
        b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        b.add_argument("--out", default=None, help="also write the JSON here (a file, or a dir such as bench/results/)")
        b.add_argument("--model", default=None)
        b.add_argument("--device", default=None)
        b.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
        b.add_argument("--weights", default=None, choices=["fp32", "bf16", "q4"],
                       help="our engine's CPU weights (see engine/loading/packed_model.py); default per bench")
        b.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (1 avoids OpenMP spin-waits on a machine shared with other jobs)")
        if name == "generate":
            b.add_argument("--peer", action="store_true", help="llama.cpp beside ours instead of transformers")
        if name == "mapcoder":
            b.add_argument("--peer", action="store_true", help="also prefill and batched decode against llama.cpp")
            b.add_argument("--problems", type=int, default=0, help="the campaign's first N problems (default: its "
                           "speed_problems, 40)")
        b.set_defaults(func=_call(target))

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server on the local engine (engine/serving/http_server.py)")
    _model_flags(p)
    p.add_argument("--adapters", default=None, help="directory of PEFT adapters, one subdirectory per role")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--host", default="127.0.0.1", help="bind address: loopback unless --allow-remote")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (set an API key too)")
    p.add_argument("--allow-host", action="append", default=[], help="also accept this Host header (repeatable)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MCL_API_KEY, "
                   "which the process list does not show)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds to read a whole request")
    p.set_defaults(func=_call("engine.serving.http_server:cli_serve"))

    p = sub.add_parser("train", help="train the four role adapters in one mixed-role run")
    p.add_argument("recipe", help="a recipes/*.toml file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields (e.g. train.steps=50)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints and adapters of an earlier run in train.out_dir (refused otherwise)")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None)
    p.set_defaults(func=_call("engine.training.trainer:cli_train"))

    p = sub.add_parser("eval", help="run a strategy over a benchmark")
    _model_flags(p)
    p.add_argument("--benchmark", required=True, help="humaneval, humaneval-wst, mbpp, mbpp-py, apps, xcodeeval, codecontests")
    p.add_argument("--strategy", default="mapcoder", choices=["mapcoder", "direct", "cot"])
    p.add_argument("--adapters", default=None)
    p.add_argument("--backend", default="local", choices=["local", "http"])
    p.add_argument("--url", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("-k", type=int, default=2, help="retrieved examples / plans")
    p.add_argument("-t", type=int, default=2, help="debug rounds per plan")
    p.add_argument("--data", default=None, help="benchmark data directory (default ../shared/data/benchmarks)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_call("eval.run:cli_eval", lambda a: dict(
        benchmark=a.benchmark, out=a.out, model=a.model, device=a.device, dtype=a.dtype, weights=a.weights,
        strategy=a.strategy, adapters=a.adapters, backend_kind=a.backend, url=a.url, limit=a.limit, k=a.k, t=a.t,
        data=a.data, concurrency=a.concurrency, max_new_tokens=a.max_new_tokens)))

    p = sub.add_parser("report", help="compare eval runs: table + PNG chart")
    p.add_argument("runs", nargs="+")
    p.add_argument("--png", default=None)
    p.set_defaults(func=_call("eval.report:cli_report", lambda a: dict(runs=a.runs, png=a.png)))

    p = sub.add_parser("distill", help="teacher trajectories -> role-tagged SFT JSONL")
    p.add_argument("--config", default=None, help="recipe TOML with a [distill] table")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_call("recipes.distill:cli_distill", lambda a: dict(config=a.config, overrides=_overrides(a.rest))))

    p = sub.add_parser("correct", help="supervisor-guided correction of failed trajectories")
    p.add_argument("--config", default=None)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_call("recipes.correct:cli_correct", lambda a: dict(config=a.config, overrides=_overrides(a.rest))))

    p = sub.add_parser("mutate", help="debugger examples: seeded bugs in the teacher's passing programs (+ the student's own failing ones)")
    p.add_argument("--config", default=None)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_call("recipes.mutate:cli_mutate", lambda a: dict(config=a.config, overrides=_overrides(a.rest))))

    p = sub.add_parser("miniature", help="the miniature campaign in resumable shards: run | status | gate | sft")
    p.add_argument("action", choices=["run", "status", "gate", "sft"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags (see `mcl miniature run --help`) and key=value "
                   "overrides of [campaign], in any order")
    p.set_defaults(func=_call("recipes.miniature:cli_miniature", lambda a: dict(action=a.action, argv=a.rest)))

    p = sub.add_parser("main", help="the main job: fetch model, train four adapters, evaluate base vs adapted")
    p.add_argument("--recipe", default=None, help="recipe TOML with a [main] table (default: built-in settings)")
    p.add_argument("--out", default=None, help="output directory (default runs/main)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="key=value overrides of [main] (e.g. limit=4)")
    p.set_defaults(func=_call("recipes.main_job:cli_main",
                              lambda a: dict(recipe=a.recipe, overrides=_overrides(a.rest), out=a.out)))
    return ap


def main(argv=None):
    from engine.errors import UserError
    args = build_parser().parse_args(argv)
    if args.cmd == "bench" and args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        rc = args.func(args)
    except (UserError, ValueError, OSError) as e:
        # Boundary errors (bad input, a full disk, engine.errors.UserError) are one clear line; everything else --
        # a RuntimeError from torch included -- is a bug and keeps its traceback.
        msg = " ".join(str(e).splitlines())
        print(f"mcl {args.cmd}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
