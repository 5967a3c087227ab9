"""`mcl bench train`: training throughput side by side in one run, same base weights, same data, same steps.

    mcl bench train --json                              # CPU: the tiny config (random weights)
    mcl bench train --json --model smollm2-135m         # CPU: SmolLM2-135M (the embedded GGUF)
    mcl bench train --json --out bench/results/         # CUDA: Qwen2.5-7B shapes, random bf16 weights

Three modes, each timed over the same number of optimizer steps after one warm-up step. The modes take turns in
rounds (mixed4, single, hf, mixed4, ...) and each reports its median round, so a busy spell on a shared machine hits all
three alike; on CPU the process CPU time is recorded beside the wall clock (1 thread: CPU time = work done):
  mixed4              our engine, four adapters, every batch holds all four roles (B/4 rows each, sorted by adapter)
  single              our engine, one adapter, the same batch with every row on that adapter
  hf_peft_sequential  transformers' model + peft get_peft_model with the same four adapters, trained one after another
                      (set_adapter(role), torch AdamW on that adapter, a plain torch loop, not HF Trainer): each role
                      gets the same steps on its own B/4 rows as in mixed4, so all three see the same tokens
Loss everywhere: token-mean cross-entropy over the second half of each row (the "assistant" part); our engine asks
the model for logits at those positions only (Transformer.forward(logits_at=...), as engine/trainer.py does), the
transformers loop computes them at every position and indexes (the model's default, as a user writes it).
Last line: {"device", "model", "rows": [{"mode", "tok_s", "step_ms", "round_tok_s", "cpu_tok_s"}], "mixed_vs_single",
"mixed_vs_hf_peft", "cpu_time": {same ratios from CPU time}, ...}.
tok_s counts input tokens (B x T per step). Goals: mixed >= 0.95x single per token, >= 2x transformers+peft.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import device_name, write_result
from engine.data import ROLES, Batch
from engine.lora import ALL_TARGETS, add_adapters
from engine.trainer import AdapterAdamW, token_losses


def _shapes(name: str, device: str, quick: bool) -> dict:
    """Batch rows, sequence length, steps per round, LoRA rank and rounds per setting (kept small on CPU)."""
    if device.startswith("cuda"):
        return dict(B=8, T=256 if quick else 512, steps=3 if quick else 4, rank=32, rounds=1 if quick else 3)
    if name == "tiny":
        return dict(B=8, T=128, steps=5 if quick else 4, rank=8, rounds=1 if quick else 15)
    return dict(B=4, T=64, steps=1, rank=16, rounds=1 if quick else 7)


def _base(name: str, device: str, dtype: torch.dtype):
    """(engine model without adapters, its config): a preset with random weights, or a real model via engine.hub."""
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
    from engine.hub import load_model
    model, _ = load_model(name, device=device, dtype=str(dtype).removeprefix("torch."))
    return model, model.cfg


def _twin(model, n_adapters: int, rank: int, names):
    """A second engine model sharing the base tensors of `model` (no copy), with its own adapters."""
    from engine.model import Transformer
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        twin = Transformer(model.cfg)
    twin.load_state_dict(base, strict=False, assign=True)
    add_adapters(twin, names[:n_adapters], rank=rank, alpha=2 * rank)
    return twin.to(next(iter(base.values())).device)


def _batch(cfg, B, T, adapter_ids, device, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    mask = torch.zeros(B, T)
    mask[:, T // 2:] = 1                                                     # loss on the second half
    return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask, torch.tensor(adapter_ids), B * T).to(device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _engine_step(model, batch: Batch, n_adapters: int, autocast_dtype):
    """One call = one optimizer step of the trainer's own step: token_losses (logits at the loss positions only),
    backward, AdapterAdamW with per-adapter clipping."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = AdapterAdamW(params, n_adapters)
    active = torch.ones(n_adapters, dtype=torch.bool)
    n_loss = batch.loss_mask.sum()
    model.train()

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


def _time(step, steps: int, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for `steps` calls of step()."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main(args):
    import peft
    import transformers
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    name = args.model or ("qwen2.5-7b-instruct" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast_dtype = torch.bfloat16 if cuda else None
    s = _shapes(name, device, args.quick)
    B, T, steps, rank, rounds = s["B"], s["T"], s["steps"], s["rank"], s["rounds"]
    roles = list(ROLES)
    model, cfg = _base(name, device, dtype)
    model.requires_grad_(False)
    tokens = B * T * steps

    per = B // 4
    mixed_ids = [a for a in range(4) for _ in range(per)]
    modes = {                                                                # one call = one step of B x T tokens
        "mixed4": _engine_step(_twin(model, 4, rank, roles), _batch(cfg, B, T, mixed_ids, device), 4, autocast_dtype),
        "single": _engine_step(_twin(model, 1, rank, roles), _batch(cfg, B, T, [0] * B, device), 1, autocast_dtype),
        "hf_peft_sequential": _hf_peft_step(model, cfg, _batch(cfg, B, T, mixed_ids, device), rank, roles,
                                            autocast_dtype),
    }
    for step in modes.values():                                              # warm-up
        step()
    # Rounds interleave the modes, so a slow spell of a shared machine hits all three alike; the median round counts.
    times = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, step in modes.items():
            times[mode].append(_time(step, steps, device))
    rows = []
    for mode, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        row = {"mode": mode, "tok_s": round(tokens / wall, 2), "step_ms": round(1000 * wall / steps, 2),
               "round_tok_s": [round(tokens / t[0], 2) for t in ts]}
        if not cuda:                                                         # 1 thread: CPU time = work done
            row["cpu_tok_s"] = round(tokens / statistics.median(t[1] for t in ts), 2)
        rows.append(row)
    for r in rows:
        print(f"{r['mode']:>20}: {r['tok_s']:10.1f} tok/s  ({r['step_ms']:.1f} ms per optimizer step of {B}x{T}; "
              f"median of {rounds} rounds of {steps} steps)", flush=True)

    tok_s = {r["mode"]: r["tok_s"] for r in rows}
    cpu = {r["mode"]: r.get("cpu_tok_s") for r in rows}
    result = {"device": device_name(device), "model": name, "dtype": str(dtype).removeprefix("torch."),
              "batch": B, "seq_len": T, "steps": steps, "rounds": rounds, "rank": rank, "targets": list(ALL_TARGETS),
              "rows": rows, "mixed_vs_single": round(tok_s["mixed4"] / tok_s["single"], 3),
              "mixed_vs_hf_peft": round(tok_s["mixed4"] / tok_s["hf_peft_sequential"], 3),
              **({} if cuda else {"cpu_time": {
                  "mixed_vs_single": round(cpu["mixed4"] / cpu["single"], 3),
                  "mixed_vs_hf_peft": round(cpu["mixed4"] / cpu["hf_peft_sequential"], 3)}}),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": torch.get_num_threads(), "host": platform.node(),
              "command": "mcl bench train" + (f" --model {args.model}" if args.model else "") +
                         (f" --threads {args.threads}" if getattr(args, "threads", None) else "") +
                         (" --quick" if args.quick else "")}
    write_result(result, args.out, f"train_{name}_{'cuda' if cuda else 'cpu'}.json")
    if args.json:
        print(json.dumps(result))
    return 0
