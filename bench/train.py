"""`mcl bench train`: training throughput and peak memory side by side, same base weights, same batch, same steps.

    mcl bench train --json --threads 1                                  # CPU: the tiny config (random weights)
    mcl bench train --json --threads 1 --model smollm2-135m --out bench/results/
    python -m bench.train --model smollm2-135m --seq-len 1280 --modes ours_fp32,ours_fp32_ckpt,peft_fp32 --rounds 1
    python -m bench.train --model qwen2.5-coder-0.5b --seq-len 1280 --modes ours_fp32_ckpt --rounds 1 --rank 32
    mcl bench train --json --out bench/results/                         # CUDA: Qwen2.5-7B shapes, random bf16 weights

Every (mode, round) runs in its own subprocess (`python -m bench.train --worker MODE ...`), so each mode's peak
memory is its own: the process's peak RSS (ru_maxrss; on CUDA torch.cuda.max_memory_allocated), reported beside
the peak right after the model was built (the weights, the library imports). Rounds interleave the modes
(A, B, C, A, B, C, ...) so a busy spell on the shared machine hits all alike; each mode reports its median round.
A round = one warm-up step + `steps` timed optimizer steps of B x T tokens.

Modes (one optimizer step = all four adapters trained on the same B x T tokens, B/4 rows per role):
  ours_fp32 / ours_fp32_ckpt     our engine, one mixed-role step (engine.training.trainer.token_losses: hidden states at the
                                 loss positions, LM head + CE in chunks; AdapterAdamW), fp32; _ckpt = activation
                                 checkpointing of every block
  ours_bf16 / ours_bf16_ckpt     the same with a bf16 base, bf16 autocast, fp32 master adapters and moments
  single                         our engine, one adapter, every row on it (the cost of mixing roles)
  peft_fp32 / peft_bf16          transformers + peft (get_peft_model, the four adapters trained one after another:
                                 set_adapter(role), forward, CE over the loss positions, backward, clip, torch AdamW),
                                 fp32 weights; _bf16 = under torch.autocast(bfloat16), the setting HF suggests for CPU
Loss everywhere: token-mean CE over the second half of each row. Last line: {"rows": [{"mode", "tok_s", "step_s",
"round_tok_s", "cpu_tok_s", "peak_gb", "load_peak_gb"}], "ratios": {...}, "cpu_ratios": {...}, ...}; tok_s counts
input tokens (B x T per step); cpu_ratios come from process CPU time, which a loaded machine does not inflate (1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import device_name, isa, write_result
from engine.lora import ALL_TARGETS, add_adapters
from engine.roles import ROLES
from engine.training.data import Batch
from engine.training.trainer import AdapterAdamW, limit_cpu_heap_growth, token_losses

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository: `-m bench.train` from here
MODES = ("ours_fp32", "ours_fp32_ckpt", "ours_bf16", "ours_bf16_ckpt", "single", "peft_fp32", "peft_bf16")


def _defaults(name: str, device: str, quick: bool) -> dict:
    """Batch rows, sequence length, timed steps per round, LoRA rank, rounds, modes (kept small on CPU)."""
    if device.startswith("cuda"):
        return dict(B=8, T=256 if quick else 512, steps=3 if quick else 4, rank=32, rounds=1 if quick else 3,
                    modes="ours_bf16,single,peft_bf16")
    if name == "tiny":
        return dict(B=8, T=128, steps=2 if quick else 4, rank=8, rounds=1 if quick else 5,
                    modes="ours_fp32,single,peft_fp32")
    return dict(B=4, T=256, steps=1, rank=32, rounds=1 if quick else 3, modes="ours_fp32,ours_fp32_ckpt,peft_fp32")


def _base(name: str, device: str, dtype: torch.dtype):
    """(engine model without adapters, its config): a preset with random weights, or a real model via engine.loading.hub."""
    from engine.config import PRESETS
    from engine.model import Transformer
    if name in PRESETS:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)                 # build directly in bf16 on CUDA: 7B in fp32 would be 30 GB
        try:
            with torch.device(device):
                model = Transformer(PRESETS[name])
        finally:
            torch.set_default_dtype(default)
        g = torch.Generator(device).manual_seed(0)     # drawn on the device: 7B of CPU randn would take a minute
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02, generator=g)
        return model, PRESETS[name]
    from engine.loading.hub import load_model
    model, _ = load_model(name, device=device, dtype=str(dtype).removeprefix("torch."))
    return model, model.cfg


def _batch(cfg, B, T, adapter_ids, device, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    mask = torch.zeros(B, T)
    mask[:, T // 2:] = 1                                                     # loss on the second half
    return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask, torch.tensor(adapter_ids), B * T).to(device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _engine_step(model, batch: Batch, roles, rank: int, ckpt: bool, autocast_dtype):
    """One call = one optimizer step of the trainer's own step: token_losses, backward, per-adapter clipping,
    AdapterAdamW."""
    add_adapters(model, roles, rank=rank, alpha=2 * rank)
    model.gradient_checkpointing = ckpt
    model.train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = AdapterAdamW(params, len(roles))
    active = torch.ones(len(roles), dtype=torch.bool)
    n_loss = batch.loss_mask.sum()

    def step():
        loss = token_losses(model, batch, autocast_dtype)[0].sum() / n_loss
        loss.backward()
        opt.accumulate()
        opt.clip_(1.0)
        opt.step(1e-4, active)
        opt.zero_grad()
    return step


def _hf_peft_step(model, cfg, batch: Batch, rank: int, roles, autocast_dtype):
    """transformers + peft, four adapters trained one after another: one call = one optimizer step of each adapter on
    its own B/4 rows (set_adapter, forward, loss, backward, clip, torch AdamW), as a user would write the loop."""
    import transformers
    from peft import LoraConfig, get_peft_model
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures", "torch_dtype")}
    hf_cfg = (transformers.LlamaConfig if cfg.arch == "llama" else transformers.Qwen2Config)(**d)
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    dtype = next(iter(base.values())).dtype
    with torch.device(batch.tokens.device):                                  # real buffers (RoPE), random weights...
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    missing, unexpected = hf.load_state_dict(base, strict=False, assign=True)  # ...replaced by ours (shared, no copy)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers twin does not match the engine model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf.to(batch.tokens.device)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(hf, lcfg, adapter_name=roles[0])
    for r in roles[1:]:
        pm.add_adapter(r, lcfg)
    pm.train()
    B = batch.tokens.shape[0]
    per = B // len(roles)
    dev = batch.tokens.device
    params = {role: [p for n, p in pm.named_parameters() if f".{role}." in n and "lora_" in n] for role in roles}
    opts = {role: torch.optim.AdamW(ps, lr=1e-4) for role, ps in params.items()}

    def step():
        for i, role in enumerate(roles):
            pm.set_adapter(role)                                             # only this adapter active and trainable
            rows = slice(i * per, (i + 1) * per)
            x, y, m = batch.tokens[rows], batch.targets[rows], batch.loss_mask[rows]
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = pm(input_ids=x).logits
            r, c = m.nonzero(as_tuple=True)
            loss = F.cross_entropy(logits[r, c].float(), y[r, c], reduction="sum") / m.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params[role], 1.0)
            opts[role].step()
            opts[role].zero_grad(set_to_none=True)
    return step


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # Linux: KiB -> GiB


def worker(a) -> dict:
    """One mode, one round, in this process: build, warm up, time `steps` steps; peak memory of this process."""
    cuda = a.device.startswith("cuda")
    if not cuda and a.worker.endswith("_ckpt"):
        limit_cpu_heap_growth()                                              # as engine.training.trainer.setup does
    bf16 = "bf16" in a.worker or cuda
    model, cfg = _base(a.model, a.device, torch.bfloat16 if bf16 and not a.worker.startswith("peft") else torch.float32)
    model.requires_grad_(False)
    load_peak = _peak_gb(a.device)
    roles = list(ROLES)
    per = a.batch // len(roles)
    mixed_ids = [r for r in range(len(roles)) for _ in range(per)]
    autocast_dtype = torch.bfloat16 if bf16 else None
    if a.worker == "single":
        step = _engine_step(model, _batch(cfg, a.batch, a.seq_len, [0] * a.batch, a.device), roles[:1], a.rank,
                            False, autocast_dtype)
    elif a.worker.startswith("ours"):
        step = _engine_step(model, _batch(cfg, a.batch, a.seq_len, mixed_ids, a.device), roles, a.rank,
                            a.worker.endswith("_ckpt"), autocast_dtype)
    else:
        step = _hf_peft_step(model, cfg, _batch(cfg, a.batch, a.seq_len, mixed_ids, a.device), a.rank, roles,
                             autocast_dtype)
    t0, c0 = time.perf_counter(), time.process_time()
    step()                                                                   # warm-up (and the first step's peak)
    warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
    times, cpus = [], []
    for _ in range(a.steps):
        _sync(a.device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(a.device)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"mode": a.worker, "step_s": statistics.median(times) if times else warm, "warmup_s": round(warm, 2),
            "cpu_s": statistics.median(cpus) if cpus else warm_cpu,           # 1 thread: CPU time = work done,
            "peak_gb": round(_peak_gb(a.device), 3), "load_peak_gb": round(load_peak, 3)}   # whatever the load


def main(args):
    import peft
    import transformers
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    name = args.model or ("qwen2.5-7b-instruct" if cuda else "tiny")
    s = _defaults(name, device, args.quick)
    given = lambda key, default: default if getattr(args, key, None) is None else getattr(args, key)
    B, T, steps, rank = given("batch", s["B"]), given("seq_len", s["T"]), given("steps", s["steps"]), given("rank", s["rank"])
    rounds, modes = given("rounds", s["rounds"]), given("modes", s["modes"]).split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    threads = getattr(args, "threads", None) or torch.get_num_threads()
    cmd = [sys.executable, "-m", "bench.train", "--model", name, "--device", device, "--batch", str(B),
           "--seq-len", str(T), "--steps", str(steps), "--rank", str(rank), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = {m: [] for m in modes}
    for r in range(rounds):                                                  # interleaved: A B C A B C ...
        for m in modes:
            p = subprocess.run(cmd + ["--worker", m], capture_output=True, text=True, env=env, cwd=_ROOT)
            if p.returncode:
                raise RuntimeError(f"bench train worker {m} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            runs[m].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds} {m:>15}: {B * T / runs[m][-1]['step_s']:8.1f} tok/s "
                  f"({B * T / runs[m][-1]['cpu_s']:.1f} per CPU second), peak {runs[m][-1]['peak_gb']:.2f} GB",
                  file=sys.stderr, flush=True)
    rows = []
    for m, rs in runs.items():
        step_s = statistics.median(x["step_s"] for x in rs)
        rows.append({"mode": m, "tok_s": round(B * T / step_s, 2), "step_s": round(step_s, 3),
                     "round_tok_s": [round(B * T / x["step_s"], 2) for x in rs],
                     "cpu_tok_s": round(B * T / statistics.median(x["cpu_s"] for x in rs), 2),
                     "peak_gb": max(x["peak_gb"] for x in rs), "load_peak_gb": max(x["load_peak_gb"] for x in rs)})
    for r in rows:
        print(f"{r['mode']:>15}: {r['tok_s']:9.1f} tok/s  {r['step_s']:8.2f} s/step of {B}x{T}  peak {r['peak_gb']:.2f} GB "
              f"(after load {r['load_peak_gb']:.2f})", flush=True)
    tok_s = {r["mode"]: r["tok_s"] for r in rows}
    # Ratios from the same rounds: per round, then the median (a busy spell cancels within a round).
    ratios, cpu_ratios = {}, {}          # cpu_ratios: from process CPU time (1 thread: robust to a loaded machine)
    for a_, b_ in [(x, y) for x in modes if not x.startswith("peft") for y in modes if y != x]:
        per_round = [runs[b_][i]["step_s"] / runs[a_][i]["step_s"] for i in range(rounds)]
        ratios[f"{a_}_vs_{b_}"] = round(statistics.median(per_round), 3)
        per_round = [runs[b_][i]["cpu_s"] / runs[a_][i]["cpu_s"] for i in range(rounds)]
        cpu_ratios[f"{a_}_vs_{b_}"] = round(statistics.median(per_round), 3)
    result = {"device": device_name(device), **isa(), "model": name, "batch": B, "seq_len": T, "steps": steps,
              "rounds": rounds, "rank": rank, "targets": list(ALL_TARGETS), "rows": rows,
              "ratios": ratios, "cpu_ratios": cpu_ratios,
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": threads, "host": platform.node(),
              "command": "python -m bench.train " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in [("model", name), ("batch", B), ("seq_len", T),
                                                             ("steps", steps), ("rank", rank), ("rounds", rounds),
                                                             ("modes", ",".join(modes)), ("threads", threads)])}
    write_result(result, args.out, f"train_{name}_{'cuda' if cuda else 'cpu'}" +
                 (f"_{T}" if T != s["T"] else "") + ".json")
    if args.json:
        print(json.dumps(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None, help="rows per step (a multiple of 4)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round after one warm-up step (0: the "
                                                             "warm-up step is the timed one)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    a = _parser().parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a)))
    else:
        sys.exit(main(a))
