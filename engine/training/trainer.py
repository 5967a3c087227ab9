"""Mixed-role LoRA training: four role adapters on one frozen base, in one run, one loop.

    mcl train recipes/mini_smollm2.toml                                  # the embedded miniature, CPU
    mcl train recipes/mini_smollm2.toml train.steps=50 data.max_len=512  # key=value overrides of the recipe
    mcl train recipes/mini_smollm2.toml --resume                         # continue from OUT/checkpoints/
    mcl train recipes/mini_smollm2.toml --overwrite                      # replace an earlier run in OUT (else refused)
    torchrun --nproc_per_node=8 -m engine.cli train recipes/mapcoder_lite_qwen2.5_7b.toml

    from engine.training.trainer import load_recipe, train
    result = train(load_recipe("recipes/mini_smollm2.toml", ["train.steps=20"]))

A step, top to bottom (`train` is the loop, `train_step` one step; `setup` builds what they use):
  1. the sampler draws the global batch (same on every rank); N = its assistant-token count
  2. this rank's micro-batches (micro_batches: by default grouped by length, so little padding), each sorted by
     adapter id (contiguous kernel segments)
  3. per micro-batch: h = model(tokens, adapter_ids, logits_at=the assistant positions, return_hidden=True) (K, dim);
     CE of the LM head's logits in chunks of rows (engine/training/chunked_ce.py: never a (K, V) tensor beyond one chunk);
     loss = (sum of CE over assistant tokens) / N; backward
     -> summed over micro-batches and ranks, the gradient is that of the global batch's token mean, so a
        mixed batch's gradient equals the sum of its single-role parts (adapters share no parameters)
  4. all-reduce (SUM) of the adapter gradients; non-finite loss or gradient -> stop, last good checkpoint untouched
  5. per-adapter gradient clipping, then AdapterAdamW: every adapter steps as if it were trained alone
  6. log (tqdm, OUT/metrics.jsonl, W&B), eval on the held-out split per role, checkpoint (engine/training/checkpoint.py)
The learning rate is a pure function of the step (lr_at), so the schedule's state is the step in the checkpoint.

Precision (model.dtype, see base_dtype): fp32 throughout, or a bf16 base: base and adapters bf16 in the forward
(bf16 autocast; the kernel takes one dtype), the loss fp32, and the optimizer keeps fp32 master adapters, fp32
gradient accumulators and fp32 moments. auto = bf16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16 /
AMX), fp32 on others (an AVX2 CPU emulates bf16 matmul ~25x slower than fp32).
Memory: train.grad_checkpointing keeps only each block's input and recomputes the block in backward.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import config_file
from engine.lora import ADAPTER_NAME, ALL_TARGETS, add_adapters, copy_peft_, read_peft_checked, save_peft
from engine.roles import ROLES
from engine.training import checkpoint as ckpt
from engine.training import distributed as D
from engine.training.chunked_ce import linear_cross_entropy
from engine.training.data import Batch, Example, RoleSampler, collate, load_sft, read_sft, split_eval
from kernels.cpu_info import native_bf16


# ---------------------------------------------------------------------------------------------------------------
# Recipe: one dataclass per TOML table. Every field is overridable as table.key=value.

@dataclass
class ModelCfg:
    name: str = "smollm2-135m"        # embedded name, HF directory, .gguf file, or "random:<preset>" (random weights)
    tokenizer: str = ""               # tokenizer.json path; "" = the model's own
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto (bf16 on cuda and on CPUs with native bf16 matmul, else fp32; a passed-in
                                      # model keeps its own) | float32 | bfloat16 (see trainer.base_dtype)

    def validate(self, source: str) -> None:
        _need(self.name != "", source, "model.name", self.name, "a model name or path")
        _need(self.dtype in ("auto", "float32", "bfloat16"), source, "model.dtype", self.dtype,
              "auto, float32 or bfloat16")


@dataclass
class LoraCfg:
    roles: list = field(default_factory=lambda: list(ROLES))    # adapter id = index in this list
    rank: int = 32
    alpha: float = 64.0               # scale = alpha / rank
    targets: list = field(default_factory=lambda: list(ALL_TARGETS))

    def validate(self, source: str) -> None:
        _need(bool(self.roles) and all(isinstance(r, str) and r for r in self.roles), source, "lora.roles",
              self.roles, "a non-empty list of role names")
        bad = [r for r in self.roles if not ADAPTER_NAME.fullmatch(r)]
        _need(not bad, source, "lora.roles", self.roles, f"plain identifiers, each also a directory name under "
              f"adapters/ (not {bad[0]!r})" if bad else "")
        dup = sorted({r for r in self.roles if self.roles.count(r) > 1})
        _need(not dup, source, "lora.roles", self.roles, f"distinct names (repeated: {', '.join(dup)})")
        _need(self.rank > 0, source, "lora.rank", self.rank, "a positive integer")
        _need(math.isfinite(self.alpha) and self.alpha > 0, source, "lora.alpha", self.alpha, "a positive number")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        _need(bool(self.targets) and not bad, source, "lora.targets", self.targets,
              f"a non-empty list from {list(ALL_TARGETS)}")


@dataclass
class DataCfg:
    path: str = "recipes/data/mini_sft.jsonl"
    max_len: int = 1024               # tokens per example; longer ones are truncated (and counted)
    eval_fraction: float = 0.05       # held out per role
    sampler: str = "uniform"          # uniform (equal share per role) | proportional (to the data)

    def validate(self, source: str) -> None:
        _need(self.max_len >= 2, source, "data.max_len", self.max_len, "an integer >= 2 (tokens per example)")
        _need(0 <= self.eval_fraction < 1, source, "data.eval_fraction", self.eval_fraction, "0 <= x < 1")
        _need(self.sampler in ("uniform", "proportional"), source, "data.sampler", self.sampler,
              "uniform or proportional")


@dataclass
class TrainCfg:
    out_dir: str = "runs/train"
    steps: int = 100                  # optimizer steps
    global_batch: int = 16            # examples per optimizer step, over all ranks
    micro_batch: int = 4              # examples per forward/backward
    group_by_length: bool = True      # micro-batches of similar lengths (less padding; same examples, same gradient)
    lr: float = 2e-4
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 10            # linear warm-up from 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0            # per-adapter gradient-norm clip; 0 = off
    grad_checkpointing: bool = False  # recompute block activations in backward
    ce_chunk: int = 256               # rows per chunk of the LM head + cross-entropy (engine/training/chunked_ce.py)
    fsdp: bool = False                # FSDP2-shard the frozen base across ranks (bases that do not fit one GPU)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0               # 0 = only at the end
    ckpt_every: int = 0               # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2

    def validate(self, source: str) -> None:
        for key in ("steps", "global_batch", "micro_batch", "log_every", "ce_chunk"):
            _need(getattr(self, key) > 0, source, f"train.{key}", getattr(self, key), "a positive integer")
        for key in ("warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints"):
            _need(getattr(self, key) >= 0, source, f"train.{key}", getattr(self, key), "an integer >= 0")
        _need(self.out_dir != "", source, "train.out_dir", self.out_dir, "a directory")
        for key, ok, want in (("lr", self.lr > 0, "> 0"), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                              ("weight_decay", self.weight_decay >= 0, ">= 0"), ("eps", self.eps > 0, "> 0"),
                              ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
                              ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)")):
            v = getattr(self, key)
            _need(ok and math.isfinite(v), source, f"train.{key}", v, f"a finite number {want}")


@dataclass
class WandbCfg:
    mode: str = "auto"                # auto (online with WANDB_API_KEY, else offline) | offline | online | disabled
    project: str = "mapcoder-lite"
    name: str = ""

    def validate(self, source: str) -> None:
        _need(self.mode in ("auto", "offline", "online", "disabled"), source, "wandb.mode", self.mode,
              "auto, offline, online or disabled")


@dataclass
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)

    def validate(self, source: str = "recipe") -> "Recipe":
        """Check every value (types are checked as they are set); errors name `source` and the key."""
        for t in dataclasses.fields(self):
            getattr(self, t.name).validate(source)
        return self


def _need(ok: bool, source: str, key: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"{source}: {key} = {value!r}: expected {want}")


def load_recipe(path: str | Path | None, overrides=()) -> Recipe:
    """Recipe TOML (tables [model] [lora] [data] [train] [wandb]) + `table.key=value` overrides (TOML literals;
    a bare word is a string), read by engine/config_file.py (the loader every command uses): an unknown key or a
    wrong type is an error naming the file and the key. Relative data/tokenizer paths resolve against the
    working directory."""
    recipe = config_file.load(Recipe, path, overrides, what="recipe key")
    where = str(path) if path is not None else "recipe"
    return recipe.validate(where + (" (with overrides)" if overrides else ""))


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule.

class AdapterAdamW:
    """AdamW over stacked adapter tensors (dim 0 = adapter id), stepping each adapter as if it were its own
    parameter trained alone: each adapter has its own step count (bias correction), and an adapter whose role
    has no tokens in the global batch is not touched (no momentum drift, no weight decay).

    How: one torch.optim.AdamW (fused where torch has the kernel) with one param group per adapter, whose parameters
    are the views w[a] of the stacked fp32 tensors. An adapter's views get a gradient only when it is active, and
    torch skips parameters without one, so inactive adapters keep weights, moments and step count. The moments are
    stacked fp32 tensors too (m, v), handed to torch as the same per-adapter views: one buffer per tensor for
    checkpoints. 16-bit parameters get fp32 masters (the tensors the optimizer steps) and fp32 gradient accumulators.
    Fused over the 4 x 210 views of SmolLM2's rank-32 adapters: 124 ms a step vs 484 ms foreach / for-loop and 438 ms
    for the hand-written torch ops over stacked tensors (1 thread, /tmp measurement in the commit message)."""

    def __init__(self, params: list[torch.nn.Parameter], n_adapters: int, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0):
        self.params, self.n = list(params), n_adapters
        f32 = dict(dtype=torch.float32)
        self.t = torch.zeros(n_adapters, dtype=torch.long)                   # steps taken, per adapter
        low = [p.dtype != torch.float32 for p in self.params]
        self.master = [p.detach().float().clone() if lo else None for p, lo in zip(self.params, low)]
        self.acc = [torch.zeros_like(p, **f32) if lo else None for p, lo in zip(self.params, low)]
        self.m = [torch.zeros_like(p, **f32) for p in self.params]
        self.v = [torch.zeros_like(p, **f32) for p in self.params]
        stepped = [p.detach() if w is None else w for p, w in zip(self.params, self.master)]   # fp32, stepped in place
        self.views = [[w[a] for w in stepped] for a in range(n_adapters)]    # [adapter][tensor]
        fused = all(w.device.type in ("cpu", "cuda") for w in stepped)
        self.opt = torch.optim.AdamW([{"params": vs} for vs in self.views], lr=0.0, betas=betas, eps=eps,
                                     weight_decay=weight_decay, fused=fused or None)
        for a, vs in enumerate(self.views):                                  # torch's state = views of m, v
            for w, m, v in zip(vs, self.m, self.v):
                self.opt.state[w] = {"step": torch.zeros((), **f32, device=w.device), "exp_avg": m[a],
                                     "exp_avg_sq": v[a]}

    def accumulate(self) -> None:
        """After each micro-batch's backward: move 16-bit grads into the fp32 accumulators."""
        for p, a in zip(self.params, self.acc):
            if a is not None and p.grad is not None:
                a.add_(p.grad.float())
                p.grad = None

    def grads(self) -> list[torch.Tensor]:
        """fp32 gradients, one per parameter (zeros where backward produced none)."""
        out = []
        for p, a in zip(self.params, self.acc):
            if a is None and p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(a if a is not None else p.grad)
        return out

    def zero_grad(self) -> None:
        for p, a in zip(self.params, self.acc):
            p.grad = None
            if a is not None:
                a.zero_()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Per-adapter global-norm clipping (torch's clip_grad_norm_ rule, per adapter). Returns norms (N,)."""
        grads = self.grads()
        per_param = [torch.linalg.vector_norm(g.reshape(self.n, -1), dim=1, dtype=torch.float32) for g in grads]
        norms = torch.linalg.vector_norm(torch.stack(per_param), dim=0)     # (N,) norm of the per-tensor norms
        if max_norm > 0:
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)                 # (N,)
            if bool((coef < 1).any()):                                        # coef == 1 everywhere: a no-op
                for g in grads:
                    g.mul_(coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))
        return norms

    @torch.no_grad()
    def step(self, lr: float, active: torch.Tensor) -> None:
        """One update of the adapters marked active (N,) bool."""
        active = active.cpu().bool()
        if not active.any():
            return
        grads = self.grads()
        for a, vs in enumerate(self.views):                                  # inactive: no grad, skipped by torch
            for w, g in zip(vs, grads):
                w.grad = g[a] if active[a] else None
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for vs in self.views:
            for w in vs:
                w.grad = None
        self.t += active.long()
        for p, w in zip(self.params, self.master):
            if w is not None:
                p.data.copy_(w)

    def state_dict(self) -> dict:
        return {"t": self.t.clone(), "m": self.m, "v": self.v, "master": self.master}

    def load_state_dict(self, st: dict) -> None:
        for name in ("m", "v", "master"):
            for i, (mine, saved) in enumerate(zip(getattr(self, name), st[name])):
                if (mine is None) != (saved is None) or (mine is not None and mine.shape != saved.shape):
                    raise ValueError(f"optimizer state {name}[{i}] does not match this model's adapters "
                                     f"(saved {None if saved is None else tuple(saved.shape)}, "
                                     f"here {None if mine is None else tuple(mine.shape)})")
                if mine is not None:
                    mine.copy_(saved)
        self.t.copy_(st["t"])
        for a, vs in enumerate(self.views):
            for w in vs:
                self.opt.state[w]["step"].fill_(float(self.t[a]))


def lr_at(step: int, tc: TrainCfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# Pieces the loop calls.

def micro_batches(examples: list[Example], micro: int, rank: int, world: int, by_length: bool) -> list[list[Example]]:
    """This rank's micro-batches of the global batch `examples` (same list on every rank).
    by_length: the global batch sorted by length (stable) is cut into micro-batches of neighbouring lengths, dealt to
    the ranks in turn (rank r: the r-th, (r+W)-th, ... of the one-process order), so rows are padded to a similar
    length; the micro-batches still partition the same examples, so the step's gradient is the same sum.
    Otherwise: rank r takes the r-th contiguous block of the batch, cut in order."""
    if not by_length:
        per = len(examples) // world
        mine = examples[rank * per:(rank + 1) * per]
        return [mine[i:i + micro] for i in range(0, per, micro)]
    ordered = sorted(examples, key=lambda e: len(e.ids))
    return [ordered[i:i + micro] for i in range(0, len(ordered), micro)][rank::world]


def token_losses(model, batch: Batch, autocast_dtype, ce_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (fp32) of the assistant targets only: (losses (K,), row of each (K,)), K = loss_mask.sum().
    The model returns the final-normed hidden states at those K positions only (logits_at, return_hidden): the final
    norm, the LM head and the log-softmax skip the prompt and padding positions; then the LM head and the CE run in
    chunks of `ce_chunk` rows (engine/training/chunked_ce.py), so no (K, V) logits tensor exists beyond one chunk's.
    A trainable output head (never the trainer's: the base is frozen) takes the plain path: (K, V) logits, then CE."""
    rows, cols = batch.loss_mask.nonzero(as_tuple=True)                         # (K,), (K,)
    at = rows * batch.tokens.shape[1] + cols                                    # (K,) flattened b * T + t
    targets = batch.targets[rows, cols]                                         # (K,)
    with torch.autocast(batch.tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        h = model(batch.tokens, adapter_ids=batch.adapter_ids, logits_at=at, return_hidden=True)   # (K, dim)
    w = model.output_weight
    if w.requires_grad and torch.is_grad_enabled():
        return F.cross_entropy(F.linear(h, w).float(), targets, reduction="none"), rows
    return linear_cross_entropy(h, w, targets, ce_chunk), rows                 # (K,) fp32


@torch.no_grad()
def evaluate(model, examples: list[Example], n_roles: int, micro_batch: int, pad_id: int, d: D.DistInfo,
             autocast_dtype, ce_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out loss per role: (sum of token CE, token count), each (n_roles,), summed over ranks.
    Every rank runs the same number of forwards (FSDP's all-gathers are collective): a rank whose share ran out
    evaluates a stand-in batch and discards it."""
    model.eval()
    sums, toks = torch.zeros(n_roles, dtype=torch.float64), torch.zeros(n_roles, dtype=torch.float64)
    per = -(-len(examples) // d.world)                                           # ceil: examples per rank
    mine = examples[d.rank * per:(d.rank + 1) * per]
    for i in range(0, per, micro_batch):
        chunk = mine[i:i + micro_batch]
        b = collate(chunk or examples[:1], pad_id).to(d.device)
        ce, rows = token_losses(model, b, autocast_dtype, ce_chunk)
        if not chunk:
            continue
        role = b.adapter_ids[rows].cpu()                                          # (K,) adapter of each loss token
        sums.index_add_(0, role, ce.double().cpu())
        toks.index_add_(0, role, torch.ones_like(ce, dtype=torch.float64).cpu())
    D.all_reduce_sum_([sums, toks], d)
    model.train()
    return sums, toks


def build_model(mc: ModelCfg, d: D.DistInfo, dtype: torch.dtype, seed: int):
    """(model, tokenizer) from the recipe: "random:<preset>" = random weights of a preset's shapes."""
    tok = None
    if mc.name.startswith("random:"):
        from engine.config import PRESETS
        from engine.model import Transformer
        preset = mc.name.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"model.name={mc.name!r}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        model = Transformer(PRESETS[preset]).init_weights(seed=seed).to(d.device, dtype)
    else:
        from engine.loading.hub import load_model
        model, tok = load_model(mc.name, device=str(d.device), dtype=str(dtype).removeprefix("torch."))
    if mc.tokenizer:
        from engine.loading.tokenizer import Tokenizer
        tok = Tokenizer.from_file(mc.tokenizer)
    return model, tok


def base_dtype(mc: ModelCfg, device: torch.device, model=None) -> torch.dtype:
    """The frozen base's dtype. model.dtype = float32 | bfloat16 as given; auto = a passed-in model's own dtype,
    else bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere. With a bf16 base the adapters are bf16 in
    the forward (fp32 masters, accumulators and moments in AdapterAdamW) and the forward runs under bf16 autocast."""
    if mc.dtype == "float32":
        return torch.float32
    if mc.dtype == "bfloat16":
        return torch.bfloat16
    if model is not None:
        return next(model.parameters()).dtype
    return torch.bfloat16 if device.type == "cuda" or native_bf16() else torch.float32


def restore_adapters(model, ckpt_dir: Path, roles: list[str]) -> None:
    """Copy checkpointed PEFT adapters into the model's stacked tensors with the PEFT loader's own check and copy
    (engine.lora.read_peft_checked / copy_peft_; exact, rows past each rank stay zero)."""
    for idx, role in enumerate(roles):
        cfg, _, rank, pairs = read_peft_checked(model, ckpt_dir / "adapters" / role)
        if rank != model.adapter_specs[idx].rank:
            raise ValueError(f"{ckpt_dir / 'adapters' / role}: rank {rank}, but the recipe's {role} adapter has rank "
                             f"{model.adapter_specs[idx].rank}")
        copy_peft_(model, idx, pairs)


class _Logger:
    """metrics.jsonl + W&B (lazily imported) on the main rank; nothing on the others."""

    def __init__(self, recipe: Recipe, out: Path, mode: str, main: bool):
        self.run, self.file = None, None
        if not main:
            return
        self.file = open(out / "metrics.jsonl", "a")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("wandb: online requested but WANDB_API_KEY is not set; logging offline", file=sys.stderr)
            mode = "offline"
        if mode != "disabled":
            import wandb
            id_file = out / "wandb_run_id"                       # a resumed run continues the same W&B run
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.run = wandb.init(project=recipe.wandb.project, name=recipe.wandb.name or out.name, mode=mode,
                                  dir=str(out), config=asdict(recipe), id=run_id, resume="allow",
                                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self, summary: dict | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()
        if self.file is not None:
            self.file.close()


def limit_cpu_heap_growth(threshold: int = 1 << 20) -> bool:
    """glibc malloc: serve allocations >= `threshold` bytes with mmap (returned to the OS when freed) and stop the
    threshold from growing. By default glibc raises it up to 32 MB after the first free of a large block, so the
    MB-sized activation tensors of a training step come from the heap, and the holes between live and freed ones
    keep the process's RSS far above what is in use (SmolLM2, 4 x 1280 tokens, checkpointed: peak RSS 6.19 GB with
    the default, 1.88 GB with this). The price: every large allocation is fresh pages, faulted in and zeroed
    (SmolLM2 4 x 128, no checkpointing: 1.7 s of system time per step beside 4.3 s of user time, 3x the page
    faults), so the trainer pins it only with train.grad_checkpointing, the low-memory setting.
    Returns False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20           # Linux: KiB -> GiB (process RSS)


# ---------------------------------------------------------------------------------------------------------------
# Setup: everything the loop needs, built once.

@dataclass
class Run:
    """What `setup` builds and the loop uses."""
    recipe: Recipe
    d: D.DistInfo
    roles: list[str]
    model: torch.nn.Module
    opt: AdapterAdamW
    sampler: RoleSampler
    eval_ex: list[Example]
    data_stats: object                # engine.training.data load statistics (summary)
    pad_id: int
    autocast_dtype: torch.dtype | None
    out: Path
    ck_root: Path
    start: int                        # first step: 0, or the resumed checkpoint's
    logger: _Logger | None = None


@dataclass
class StepStats:
    """One optimizer step's numbers, for the log."""
    loss: float
    lr: float
    seconds: float
    role_loss: torch.Tensor           # (R,) sum of token CE per role
    role_tok: torch.Tensor            # (R,) assistant tokens per role
    norms: torch.Tensor               # (R,) per-adapter gradient norm before clipping
    n_real: torch.Tensor              # (2,) non-pad tokens, tokens computed

    @property
    def tok_s(self) -> float:
        return float(self.n_real[0]) / self.seconds


def setup(recipe: Recipe, model=None, tokenizer=None, resume: bool = False, wandb_mode: str | None = None,
          overwrite: bool = False) -> Run:
    """Check the recipe and the output directory, build the model and adapters, load the data, resume."""
    mc, lc, dc, tc = recipe.validate().model, recipe.lora, recipe.data, recipe.train
    roles = list(lc.roles)
    sft_rows = read_sft(dc.path, roles)                     # the data is checked before anything loads or is written
    d = D.init(mc.device)
    if tc.global_batch % (tc.micro_batch * d.world):
        raise ValueError(f"train.global_batch={tc.global_batch} must be a multiple of train.micro_batch "
                         f"({tc.micro_batch}) x ranks ({d.world})")
    out = Path(tc.out_dir)
    ck_root = out / "checkpoints"
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if not resume and not overwrite and ckpt.list_checkpoints(ck_root):  # every rank sees it: no one waits
        raise ValueError(f"{ck_root}: holds checkpoints of an earlier run; pass --resume to continue it, "
                         f"--overwrite to start over, or choose another train.out_dir")
    if not overwrite and ckpt.finished_adapters(out) and not (resume and ckpt.list_checkpoints(ck_root)):
        raise ValueError(f"{out / 'adapters'}: holds the finished adapters of an earlier run; pass --overwrite to "
                         f"replace them, or choose another train.out_dir")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.sweep(ck_root)
    D.barrier(d)
    torch.manual_seed(tc.seed)
    if d.device.type == "cpu" and tc.grad_checkpointing:                 # the low-memory setting: see the function
        limit_cpu_heap_growth()

    model, tokenizer, opt = _model_and_optimizer(recipe, d, model, tokenizer)
    data = load_sft(dc.path, tokenizer, roles, dc.max_len, rows=sft_rows)
    vocab = model.cfg.vocab_size
    for e in data.examples:
        if max(e.ids) >= vocab:
            raise ValueError(f"{e.where}: token id {max(e.ids)} >= the model's vocab_size {vocab} (tokenizer/model mismatch)")
    train_ex, eval_ex = split_eval(data.examples, dc.eval_fraction, tc.seed)
    if d.main:
        s = data.stats
        print(f"data: {len(data.examples)} examples {s.per_role} from {dc.path}; {s.truncated} truncated to "
              f"{dc.max_len} tokens, {s.dropped} dropped (no assistant token left); {len(eval_ex)} held out",
              file=sys.stderr)
    dtype = next(p for n, p in model.named_parameters() if "lora_" not in n).dtype
    run = Run(recipe, d, roles, model, opt, RoleSampler(train_ex, len(roles), dc.sampler, tc.seed), eval_ex,
              data.stats, getattr(tokenizer, "pad_id", None) or 0,
              torch.bfloat16 if dtype == torch.bfloat16 else None, out, ck_root, 0)
    if resume:
        run.start = _resume(run)
    if overwrite and d.main:                                # only now, with model and data loaded
        removed = ckpt.clear_run(out)
        if removed:
            print(f"overwrite: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)
    D.barrier(d)
    run.logger = _Logger(recipe, out, wandb_mode or recipe.wandb.mode, d.main)
    return run


def _model_and_optimizer(recipe: Recipe, d: D.DistInfo, model, tokenizer):
    """(model with the role adapters attached, tokenizer, AdapterAdamW): built from recipe.model, or the model passed
    in, in base_dtype(); activation checkpointing as the recipe says; FSDP-sharded base if asked."""
    mc, lc, tc = recipe.model, recipe.lora, recipe.train
    dtype = base_dtype(mc, d.device, model)
    if model is None:
        model, tok = build_model(mc, d, dtype, tc.seed)
        tokenizer = tokenizer or tok
    else:
        model = model.to(d.device, dtype)
    if tokenizer is None:
        raise ValueError(f"model.name={mc.name!r} comes without a tokenizer; set model.tokenizer to a tokenizer.json")
    add_adapters(model, lc.roles, rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), seed=tc.seed)
    model.gradient_checkpointing = tc.grad_checkpointing
    model.train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    D.broadcast_(params, d)
    if tc.fsdp:
        if not d.on:
            raise ValueError("train.fsdp = true needs several processes (launch with torchrun)")
        n_sharded = D.shard_base(model, d)
        if d.main:
            print(f"fsdp: {n_sharded} base tensors sharded over {d.world} ranks; {len(params)} adapter tensors replicated",
                  file=sys.stderr)
    return model, tokenizer, AdapterAdamW(params, len(lc.roles), (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)


def _resume(run: Run) -> int:
    """Restore adapters, optimizer, RNG and data cursor from the newest good checkpoint; returns its step (0: none)."""
    d = run.d
    last = ckpt.latest_good(run.ck_root, log=lambda m: print(m, file=sys.stderr) if d.main else None)
    if last is None:
        if d.main:
            print(f"resume: no checkpoint under {run.ck_root}; starting from step 0", file=sys.stderr)
        return 0
    state = json.loads((last / "trainer_state.json").read_text())
    if state["roles"] != run.roles:
        raise ValueError(f"{last}: checkpoint roles {state['roles']} differ from the recipe's {run.roles}")
    restore_adapters(run.model, last, run.roles)
    try:
        run.opt.load_state_dict(ckpt.read_state(last, "optimizer"))
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{last}: optimizer state of the wrong form ({type(e).__name__}: {e})") from None
    rng_name = f"rng_rank{d.rank}"
    if not any((last / f"{rng_name}{ext}").is_file() for ext in (".safetensors", ".pt")):
        rng_name = "rng_rank0"
    try:
        rng = ckpt.read_state(last, rng_name)
    except ValueError as e:
        if (last / f"{rng_name}.safetensors").is_file():
            raise
        rng = None                                   # an older checkpoint's pickled numpy state: go on without it
        if d.main:
            print(f"resume: {e}; the RNG state is not restored (sampling differs from an uninterrupted run)",
                  file=sys.stderr)
    if rng is not None:
        try:
            ckpt.set_rng_state(rng)
        except ValueError as e:
            raise ValueError(f"{last / rng_name}: {e}") from None
    run.sampler.load_state_dict(state["data_cursor"])
    if d.main:
        print(f"resume: {last} (step {state['step']})", file=sys.stderr)
    return state["step"]


def save_checkpoint(run: Run, step: int) -> Path | None:
    """OUT/checkpoints/step_N (engine/training/checkpoint.py: atomic; a full disk leaves the last good one intact)."""
    d, tc = run.d, run.recipe.train
    path = None
    with ckpt.writing(run.ck_root, step) as tmp:
        if d.main:
            tmp.mkdir(parents=True, exist_ok=True)
        D.barrier(d)
        ckpt.write_rng(tmp, d.rank)
        D.barrier(d)
        if d.main:
            for role in run.roles:
                save_peft(run.model, role, tmp / "adapters" / role, base_model=run.recipe.model.name)
            ckpt.save_state(run.opt.state_dict(), tmp / "optimizer.safetensors")
            state = {"step": step, "roles": run.roles, "data_cursor": run.sampler.state_dict(),
                     "schedule": {"lr": tc.lr, "warmup_steps": tc.warmup_steps, "steps": tc.steps,
                                  "min_lr_ratio": tc.min_lr_ratio, "next_lr": lr_at(step, tc)},
                     "recipe": asdict(run.recipe)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            path = ckpt.finalize(run.ck_root, step, tc.keep_checkpoints)
    D.barrier(d)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The loop.

def train(recipe: Recipe, *, model=None, tokenizer=None, resume: bool = False, wandb_mode: str | None = None,
          overwrite: bool = False) -> dict:
    """Train the role adapters as the recipe says; returns a summary dict (also OUT/train_summary.json).
    `model` / `tokenizer` may be passed in (tests); otherwise built from recipe.model. `overwrite`: replace an
    earlier run's checkpoints and adapters in train.out_dir (refused otherwise, unless `resume`)."""
    run = setup(recipe, model, tokenizer, resume, wandb_mode, overwrite)
    tc, history, eval_loss, tok_s = recipe.train, [], {}, 0.0
    from tqdm import tqdm
    bar = tqdm(range(run.start, tc.steps), initial=run.start, total=tc.steps, disable=not run.d.main, desc="train",
               dynamic_ncols=True)
    try:
        for step in bar:
            s = train_step(run, step)                      # micro-batches -> all-reduce -> clip -> AdamW
            done, tok_s = step + 1, s.tok_s
            if run.d.main and (done % tc.log_every == 0 or done == tc.steps):
                history.append(log_step(run, s, done))
                bar.set_postfix(loss=f"{s.loss:.4f}", tok_s=f"{tok_s:.0f}")
            if run.eval_ex and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps):
                eval_loss = eval_step(run, done)
            if tc.ckpt_every and done % tc.ckpt_every == 0:
                save_checkpoint(run, done)
        return finish(run, history, eval_loss, tok_s)
    except BaseException:
        run.logger.close()
        raise
    finally:
        bar.close()
        D.close(run.d)


def train_step(run: Run, step: int) -> StepStats:
    """One optimizer step on the global batch; raises before touching the adapters if the loss or a gradient is
    not finite (the last good checkpoint is left as it is)."""
    tc, d, R = run.recipe.train, run.d, len(run.roles)
    t0 = time.perf_counter()
    examples = run.sampler.draw(tc.global_batch)                    # identical on every rank
    n_loss = sum(e.n_loss for e in examples)                        # normaliser: the global batch's assistant tokens
    role_loss = torch.zeros(R, dtype=torch.float64)                 # sum of token CE per role
    role_tok = torch.zeros(R, dtype=torch.float64)                  # assistant tokens per role
    n_real = torch.zeros(2, dtype=torch.float64)                    # non-pad tokens (throughput), tokens computed
    for mb in micro_batches(examples, tc.micro_batch, d.rank, d.world, tc.group_by_length):
        b = collate(mb, run.pad_id).to(d.device)
        ce, rows = token_losses(run.model, b, run.autocast_dtype, tc.ce_chunk)   # (K,) CE of assistant tokens
        (ce.sum() / n_loss).backward()                              # this micro-batch's share of the mean
        run.opt.accumulate()
        role = b.adapter_ids[rows].cpu()                            # (K,) adapter of each loss token
        role_loss.index_add_(0, role, ce.detach().double().cpu())
        role_tok.index_add_(0, role, torch.ones_like(ce, dtype=torch.float64).cpu())
        n_real += torch.tensor([b.n_real, b.tokens.numel()], dtype=torch.float64)
    D.all_reduce_sum_(run.opt.grads() + [role_loss, role_tok, n_real], d)
    loss = float(role_loss.sum() / n_loss)
    norms = run.opt.clip_(tc.grad_clip)                             # per-adapter norms, before clipping
    if not math.isfinite(loss) or not bool(torch.isfinite(norms).all()):
        what = "loss" if not math.isfinite(loss) else "gradient"
        per_role = {r: (round(float(role_loss[i] / role_tok[i]), 4), round(float(norms[i]), 4))
                    for i, r in enumerate(run.roles) if role_tok[i] > 0}
        last = ckpt.latest(run.ck_root)
        raise RuntimeError(f"non-finite {what} at step {step + 1} (loss={loss}; per role (loss, grad norm): "
                           f"{per_role}); stopped before updating the adapters. Last good checkpoint: "
                           f"{last if last else 'none (no checkpoint was written yet)'}")
    lr = lr_at(step, tc)
    run.opt.step(lr, active=role_tok > 0)
    run.opt.zero_grad()
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    return StepStats(loss, lr, time.perf_counter() - t0, role_loss, role_tok, norms, n_real)


def log_step(run: Run, s: StepStats, done: int) -> dict:
    """metrics.jsonl / W&B record of one step (main rank)."""
    m = {"train/loss": s.loss, "train/lr": s.lr, "perf/tok_s": s.tok_s, "perf/peak_mem_gb": _peak_mem_gb(run.d.device),
         "perf/step_s": s.seconds, "perf/padding": float(1 - s.n_real[0] / s.n_real[1])}   # share of pad tokens
    for i, r in enumerate(run.roles):
        if s.role_tok[i] > 0:
            m[f"train/loss/{r}"] = float(s.role_loss[i] / s.role_tok[i])
        m[f"train/tokens/{r}"] = int(s.role_tok[i])
        m[f"train/grad_norm/{r}"] = float(s.norms[i])
    run.logger.log(m, done)
    return m


def eval_step(run: Run, done: int) -> dict:
    """Held-out loss per role, logged; {role: loss}."""
    tc = run.recipe.train
    sums, toks = evaluate(run.model, run.eval_ex, len(run.roles), tc.micro_batch, run.pad_id, run.d,
                          run.autocast_dtype, tc.ce_chunk)
    eval_loss = {r: float(sums[i] / toks[i]) for i, r in enumerate(run.roles) if toks[i] > 0}
    run.logger.log({f"eval/loss/{r}": v for r, v in eval_loss.items()}, done)
    return eval_loss


def finish(run: Run, history: list[dict], eval_loss: dict, tok_s: float) -> dict:
    """Final adapters (PEFT format) and OUT/train_summary.json; the summary (+ history) is returned."""
    tc, out = run.recipe.train, run.out
    summary = {"steps": tc.steps, "roles": run.roles, "final_loss": history[-1]["train/loss"] if history else None,
               "eval_loss": eval_loss, "tok_s": tok_s, "data": asdict(run.data_stats),
               "adapters": str(out / "adapters")}
    if run.d.main:
        for role in run.roles:
            save_peft(run.model, role, out / "adapters" / role, base_model=run.recipe.model.name)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    D.barrier(run.d)
    run.logger.close({k: v for k, v in summary.items() if k in ("final_loss", "tok_s")})
    return {**summary, "history": history}


def cli_train(args) -> int:
    """`mcl train RECIPE.toml [key=value ...] [--resume] [--wandb MODE]`."""
    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume, wandb_mode=args.wandb, overwrite=getattr(args, "overwrite", False))
    return 0
