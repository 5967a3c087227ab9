"""`mcl bench train`: training throughput side by side in one run, same base weights, same data, same steps.

    mcl bench train --json                              # CPU: the tiny config (random weights)
    mcl bench train --json --model smollm2-135m         # CPU: SmolLM2-135M (the embedded GGUF)
    mcl bench train --json --out bench/results/         # CUDA: Qwen2.5-7B shapes, random bf16 weights

Three modes, each timed over the same number of optimizer steps after one warm-up step:
  mixed4              our engine, four adapters, every batch holds all four roles (B/4 rows each, sorted by adapter)
  single              our engine, one adapter, the same batch with every row on that adapter
  hf_peft_sequential  transformers' model + peft get_peft_model with the same four adapters, trained one after another
                      (set_adapter(role), torch AdamW on that adapter, a plain torch loop, not HF Trainer): each role
                      gets the same steps on its own B/4 rows as in mixed4, so all three see the same tokens
Loss everywhere: token-mean cross-entropy over the second half of each row (the "assistant" part).
Last line: {"device", "model", "rows": [{"mode", "tok_s", "step_ms"}], "mixed_vs_single", "mixed_vs_hf_peft", ...}.
tok_s counts input tokens (B x T per step). Goals: mixed >= 0.95x single per token, >= 2x transformers+peft.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.bench_generate import _device_name, _write
from engine.data import ROLES, Batch
from engine.lora import ALL_TARGETS, add_adapters
from engine.trainer import AdapterAdamW, token_losses


def _shapes(name: str, device: str, quick: bool) -> dict:
    """Batch rows, sequence length, steps and LoRA rank per setting (kept small on CPU)."""
    if device.startswith("cuda"):
        return dict(B=8, T=256 if quick else 512, steps=3 if quick else 8, rank=32)   # 7B: ~25 GB of activations
    if name == "tiny":
        return dict(B=8, T=128, steps=5 if quick else 20, rank=8)
    return dict(B=4, T=64, steps=2 if quick else 4, rank=16)


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


def _time_engine(model, batch: Batch, steps: int, n_adapters: int, autocast_dtype) -> float:
    """Seconds for `steps` optimizer steps (after one warm-up step) of the trainer's own step."""
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

    step()
    _sync(batch.tokens.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(batch.tokens.device)
    return time.perf_counter() - t0


def _time_hf_peft(model, cfg, batch: Batch, steps: int, rank: int, roles, autocast_dtype) -> float:
    """transformers + peft, four adapters trained one after another on their own rows of the batch."""
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

    def run(steps_per_role):
        for i, role in enumerate(roles):
            pm.set_adapter(role)
            params = [p for n, p in pm.named_parameters() if f".{role}." in n and "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=1e-4)
            rows = slice(i * per, (i + 1) * per)
            x, y, m = batch.tokens[rows], batch.targets[rows], batch.loss_mask[rows]
            for _ in range(steps_per_role):
                with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = pm(input_ids=x).logits
                r, c = m.nonzero(as_tuple=True)
                loss = F.cross_entropy(logits[r, c].float(), y[r, c], reduction="sum") / m.sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

    run(1)                                                                   # warm-up: one step per adapter
    _sync(dev)
    t0 = time.perf_counter()
    run(steps)
    _sync(dev)
    return time.perf_counter() - t0


def main(args):
    import peft
    import transformers
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    name = args.model or ("qwen2.5-7b-instruct" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast_dtype = torch.bfloat16 if cuda else None
    s = _shapes(name, device, args.quick)
    B, T, steps, rank = s["B"], s["T"], s["steps"], s["rank"]
    roles = list(ROLES)
    model, cfg = _base(name, device, dtype)
    model.requires_grad_(False)
    tokens = B * T * steps

    rows = []
    mixed = _twin(model, 4, rank, roles)
    per = B // 4
    t = _time_engine(mixed, _batch(cfg, B, T, [a for a in range(4) for _ in range(per)], device), steps, 4,
                     autocast_dtype)
    rows.append({"mode": "mixed4", "tok_s": round(tokens / t, 2), "step_ms": round(1000 * t / steps, 2)})
    del mixed
    single = _twin(model, 1, rank, roles)
    t = _time_engine(single, _batch(cfg, B, T, [0] * B, device), steps, 1, autocast_dtype)
    rows.append({"mode": "single", "tok_s": round(tokens / t, 2), "step_ms": round(1000 * t / steps, 2)})
    del single
    if cuda:
        torch.cuda.empty_cache()
    t = _time_hf_peft(model, cfg, _batch(cfg, B, T, [a for a in range(4) for _ in range(per)], device), steps, rank,
                      roles, autocast_dtype)
    rows.append({"mode": "hf_peft_sequential", "tok_s": round(tokens / t, 2), "step_ms": round(1000 * t / steps, 2)})
    for r in rows:
        print(f"{r['mode']:>20}: {r['tok_s']:10.1f} tok/s  ({r['step_ms']:.1f} ms per optimizer step of {B}x{T})",
              flush=True)

    tok_s = {r["mode"]: r["tok_s"] for r in rows}
    result = {"device": _device_name(device), "model": name, "dtype": str(dtype).removeprefix("torch."),
              "batch": B, "seq_len": T, "steps": steps, "rank": rank, "targets": list(ALL_TARGETS),
              "rows": rows, "mixed_vs_single": round(tok_s["mixed4"] / tok_s["single"], 3),
              "mixed_vs_hf_peft": round(tok_s["mixed4"] / tok_s["hf_peft_sequential"], 3),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": torch.get_num_threads(), "host": platform.node(),
              "command": "mcl bench train" + (f" --model {args.model}" if args.model else "") +
                         (" --quick" if args.quick else "")}
    _write(result, args.out, f"train_{name}_{'cuda' if cuda else 'cpu'}.json")
    if args.json:
        print(json.dumps(result))
    return 0
