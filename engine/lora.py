"""Multi-adapter LoRA: one frozen projection, N adapters live at once, chosen per token.

         x ──────────────► W (frozen) ──────────────┐
         │                                           + ──► y
         └─► A[a] (r_a x in) ─► B[a] (out x r_a) ─► s[a]      a = adapter id of the token (-1: none)

    y = x W^T + b + s[a] (x A[a]^T) B[a]^T,  s[a] = alpha_a / r_a

Adapters are stacked: lora_A (N, R, in), lora_B (N, out, R), zero-padded to R = max rank, so one
kernel launch (kernels.multi_lora) serves a batch that mixes adapters. Padding stays exactly zero under
training (its gradients are zero). Init as PEFT: A Kaiming-uniform, B zero, so a new adapter is a no-op.

    from engine.lora import add_adapters, save_peft, load_adapters, merge_adapter
    add_adapters(model, ["retriever", "planner", "coder", "debugger"], rank=32, alpha=64)
    logits = model(tokens, adapter_ids=torch.tensor([2, 0, -1]))      # coder, retriever, base
    save_peft(model, "coder", "out/adapters/coder")                    # PEFT's format, loads in peft
    load_adapters(model, "out/adapters")                               # every subdirectory = one adapter
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import read_json

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRABatch:
    """What every projection needs to apply adapters to a batch: kernel segments, built once per forward."""
    seg: object                 # kernels.multi_lora.Segments
    backend: str = "auto"

    @classmethod
    def from_ids(cls, adapter_ids: torch.Tensor, B: int, T: int, n_adapters: int, backend: str = "auto") -> "LoRABatch":
        from kernels.multi_lora import make_segments
        ids = adapter_ids
        if ids.dim() == 1:
            if ids.shape[0] != B:
                raise ValueError(f"adapter_ids has shape {tuple(ids.shape)}; expected ({B},) or ({B}, {T})")
            ids = ids[:, None].expand(B, T)                                  # (B, T)
        if tuple(ids.shape) != (B, T):
            raise ValueError(f"adapter_ids has shape {tuple(ids.shape)}; expected ({B},) or ({B}, {T})")
        return cls(make_segments(ids.reshape(-1), n_adapters), backend)


class LoRALinear(nn.Module):
    """A linear layer (HF layout: weight (out, in)) that can carry N stacked LoRA adapters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_A: nn.Parameter | None = None                              # (N, R, in)
        self.lora_B: nn.Parameter | None = None                              # (N, out, R)
        self.register_buffer("lora_scale", torch.zeros(0), persistent=False)  # (N,) fp32
        self.ranks: list[int] = []
        if not self.weight.is_meta:                  # skipped on meta: see engine.model.on_meta
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if lora is None or self.lora_A is None:
            return F.linear(x, self.weight, self.bias)
        from kernels.multi_lora import multi_lora
        x2 = x.reshape(-1, self.in_features)                                 # (B*T, in)
        y = multi_lora(x2, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_scale, lora.seg,
                       backend=lora.backend)
        return y.view(*x.shape[:-1], self.out_features)

    # --- adapter slots -------------------------------------------------------------------
    def set_adapters(self, ranks: list[int], scales: list[float], seed: int = 0):
        """(Re)build the stacks for len(ranks) adapters, keeping the weights of existing ones."""
        n, R = len(ranks), max(ranks)
        # a weight on the meta device (a packed model keeps only its packed copy): the adapters go beside the buffers
        dev, dt = (self.lora_scale.device if self.weight.is_meta else self.weight.device), self.weight.dtype
        A = torch.zeros(n, R, self.in_features, device=dev, dtype=dt)
        B = torch.zeros(n, self.out_features, R, device=dev, dtype=dt)
        g = torch.Generator().manual_seed(seed)
        for i, r in enumerate(ranks):
            if i < len(self.ranks):                                          # keep an existing adapter
                r_old = self.ranks[i]
                if r_old != r:
                    raise ValueError(f"adapter {i} already has rank {r_old}, asked for {r}")
                A[i, :r] = self.lora_A.data[i, :r]
                B[i, :, :r] = self.lora_B.data[i, :, :r]
            else:                                                            # new: Kaiming-uniform A, zero B
                bound = 1.0 / math.sqrt(self.in_features)                    # kaiming_uniform_(a=sqrt(5)) bound
                A[i, :r] = (torch.rand(r, self.in_features, generator=g) * 2 - 1).to(dt) * bound
        self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
        self.lora_scale = torch.tensor(scales, dtype=torch.float32, device=dev)
        self.ranks = list(ranks)

    def merge(self, idx: int) -> None:
        """Fold adapter idx into the base weight: W += s (B A). The adapter itself is left in place."""
        r = self.ranks[idx]
        with torch.no_grad():
            delta = self.lora_B[idx, :, :r].float() @ self.lora_A[idx, :r].float()   # (out, in)
            self.weight += (self.lora_scale[idx] * delta).to(self.weight.dtype)


# --- model-level helpers ----------------------------------------------------------------------
def lora_layers(model: nn.Module, targets=ALL_TARGETS):
    """(module path, LoRALinear) for every targeted projection, in model order."""
    for path, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and path.rsplit(".", 1)[-1] in targets:
            yield path, mod


@dataclass
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...] = ALL_TARGETS
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name) -> None:
    """An adapter (role) name is also a directory name (adapters/<role>/): a plain identifier (letters, digits, _ and
    -, 64 at most), never a path such as '../../x' or '/abs'. ValueError naming it otherwise."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: expected a plain identifier (letters, digits, '_', '-'; "
                         f"starting with a letter or '_'), not a path")


def add_adapters(model: nn.Module, names, rank: int | dict = 32, alpha: float | dict | None = None,
                 targets=ALL_TARGETS, seed: int = 0, freeze_base: bool = True) -> list[AdapterSpec]:
    """Attach new adapters (appended after existing ones; id = position in model.adapter_names)."""
    specs = list(getattr(model, "adapter_specs", []))
    for name in names:
        check_adapter_name(name)
        if name in model.adapter_names:
            raise ValueError(f"adapter {name!r} already exists")
        r = rank[name] if isinstance(rank, dict) else rank
        a = (alpha[name] if isinstance(alpha, dict) else alpha) if alpha is not None else 2 * r
        specs.append(AdapterSpec(name, int(r), float(a), tuple(targets)))
    _install(model, specs, seed)
    if freeze_base:
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    return specs


def _install(model: nn.Module, specs: list[AdapterSpec], seed: int):
    unknown = set(t for s in specs for t in s.targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; choose from {list(ALL_TARGETS)}")
    for li, (path, layer) in enumerate(lora_layers(model)):
        kind = path.rsplit(".", 1)[-1]
        # An adapter that does not target this projection gets scale 0 (its rows stay zero and unused).
        ranks = [s.rank for s in specs]
        scales = [s.scale if kind in s.targets else 0.0 for s in specs]
        layer.set_adapters(ranks, scales, seed=seed * 100003 + li)
    model.adapter_names = [s.name for s in specs]
    model.adapter_specs = specs


def adapter_id(model: nn.Module, name: str | None) -> int:
    if name is None:
        return -1
    try:
        return model.adapter_names.index(name)
    except ValueError:
        raise ValueError(f"unknown adapter {name!r}; loaded: {model.adapter_names or 'none'}") from None


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold one adapter into the base weights (e.g. to serve a single role with no LoRA cost)."""
    idx = adapter_id(model, name)
    for _, layer in lora_layers(model):
        if layer.lora_scale[idx] != 0:
            layer.merge(idx)


# --- PEFT format ------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights under PEFT's key names, unpadded to its own rank."""
    idx = adapter_id(model, name)
    spec = model.adapter_specs[idx]
    out = {}
    for path, layer in lora_layers(model, spec.targets):
        r = layer.ranks[idx]
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[idx, :r].detach().contiguous().clone()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[idx, :, :r].detach().contiguous().clone()
    return out


def save_peft(model: nn.Module, name: str, out_dir: str | os.PathLike, base_model: str = "") -> Path:
    """Write out_dir/adapter_model.safetensors + adapter_config.json (temp file + rename for each)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    spec = model.adapter_specs[adapter_id(model, name)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.use_rslora,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    tensors = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in adapter_state_dict(model, name).items()}
    tmp = out / ".adapter_model.safetensors.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except SafetensorError as e:          # a full disk: "I/O error: No space left on device (os error 28)"
        tmp.unlink(missing_ok=True)
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
        raise OSError(code, os.strerror(code), str(out / "adapter_model.safetensors")) from e
    os.replace(tmp, out / "adapter_model.safetensors")
    tmp = out / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out / "adapter_config.json")
    return out


def read_peft_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT LoRA directory, checked field by field (errors name the file and the field)."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (a PEFT adapter directory holds adapter_config.json "
                                    "and adapter_model.safetensors)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (PEFT's LoraConfig), got {type(cfg).__name__}")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in cfg:
            raise ValueError(f"{cfg_path}: missing field {field!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={cfg['peft_type']!r}; only LORA adapters are supported")
    r, alpha, tm = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{cfg_path}: field 'r' = {json.dumps(r)}: expected a positive integer (the LoRA rank)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{cfg_path}: field 'lora_alpha' = {json.dumps(alpha)}: expected a positive number "
                         f"(scale = alpha / r)")
    if not (isinstance(tm, str) or isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
        raise ValueError(f"{cfg_path}: field 'target_modules' = {json.dumps(tm)}: expected a module name or a "
                         f"non-empty list of them")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise ValueError(f"{cfg_path}: field 'use_rslora' = {json.dumps(cfg['use_rslora'])}: "
                         f"expected true or false")
    return cfg


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    cfg = read_peft_config(adapter_dir)
    w_path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        tensors = load_file(str(w_path))
    except Exception as e:                                                 # safetensors raises its own types
        raise ValueError(f"{w_path}: cannot read safetensors ({e})") from None
    return cfg, tensors


def read_peft_checked(model: nn.Module, adapter_dir: str | os.PathLike):
    """(config, targets, rank, {module path: (A (r, in), B (out, r))}) of a PEFT LoRA directory, every tensor
    checked against this model's projections (errors name the file, the tensor and the shapes)."""
    cfg, tensors = read_peft(adapter_dir)
    w_path = Path(adapter_dir) / "adapter_model.safetensors"
    tm = cfg["target_modules"]
    targets = tuple(t for t in ALL_TARGETS if (t in tm if isinstance(tm, list) else t in str(tm)))
    rank = int(cfg["r"])
    expected = {}
    for path, layer in lora_layers(model, targets):
        expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (path, "A", (rank, layer.in_features))
        expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (path, "B", (layer.out_features, rank))
    found = {}
    for key, t in tensors.items():
        key_n = key.replace(".default.weight", ".weight")
        if key_n not in expected:
            raise ValueError(f"{w_path}: tensor {key!r} does not match any targeted projection of this model")
        path, which, want = expected[key_n]
        if tuple(t.shape) != want:
            raise ValueError(f"{w_path}: tensor {key!r} has shape {tuple(t.shape)}, expected {want}")
        found[key_n] = t
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"{w_path}: missing tensors, e.g. {missing[0]!r} ({len(missing)} in all)")
    pairs: dict[str, dict] = {}
    for key_n, t in found.items():
        path, which, _ = expected[key_n]
        pairs.setdefault(path, {})[which] = t
    return cfg, targets, rank, {path: (ab["A"], ab["B"]) for path, ab in pairs.items()}


def copy_peft_(model: nn.Module, idx: int, pairs: dict) -> None:
    """Write checked PEFT tensors {module path: (A, B)} into adapter slot idx (rows past their rank stay as they are)."""
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            layer = model.get_submodule(path)
            layer.lora_A[idx, :a.shape[0]] = a.to(layer.lora_A.dtype)
            layer.lora_B[idx, :, :b.shape[1]] = b.to(layer.lora_B.dtype)


def load_peft(model: nn.Module, adapter_dir: str | os.PathLike, name: str | None = None) -> str:
    """Add one PEFT LoRA adapter from a directory under `name` (default: the directory's name).

    Every tensor is checked against the model before anything is attached, so a bad file changes nothing."""
    cfg, targets, rank, pairs = read_peft_checked(model, adapter_dir)
    name = name or Path(adapter_dir).name
    add_adapters(model, [name], rank=rank, alpha=float(cfg["lora_alpha"]), targets=targets)
    idx = adapter_id(model, name)
    if cfg.get("use_rslora", False):
        model.adapter_specs[idx].use_rslora = True
        _install(model, model.adapter_specs, seed=0)                      # recompute scales, keep weights
    copy_peft_(model, idx, pairs)
    return name


def load_adapters(model: nn.Module, root: str | os.PathLike, names=None) -> list[str]:
    """Load every adapter directory under root (or just `names`), each under its directory's name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: adapter directory not found")
    # Every subdirectory is an adapter: one without adapter_config.json is refused, not skipped (skipping it would
    # run that role on the bare base model without a word). Hidden entries (.tmp_*, .ipynb_checkpoints) are not.
    dirs = [root / n for n in names] if names else \
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise FileNotFoundError(f"{root}: no adapter subdirectories (each needs adapter_config.json)")
    for d in dirs:                                     # every config checked before any adapter is attached
        read_peft_config(d)
    return [load_peft(model, d) for d in dirs]
