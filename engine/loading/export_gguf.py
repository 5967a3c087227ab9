"""A PEFT LoRA adapter -> llama.cpp's GGUF LoRA adapter file, checked against the base GGUF; `mcl export --gguf`.

    mcl export --gguf runs/main/train/adapters/coder coder.gguf [--model smollm2-135m]
    from engine.loading.export_gguf import export_gguf
    export_gguf("runs/main/train/adapters/coder", "coder.gguf", model="smollm2-135m")
    # then, in llama.cpp:  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora coder.gguf
    #      or llama-cpp-python:  llama_cpp.Llama(model_path=<base gguf>, lora_path="coder.gguf")

The format, as llama.cpp's src/llama-adapter.cpp reads it (its convert_lora_to_gguf.py writes the same from PEFT):
  metadata  general.architecture = the base's ("llama", "qwen2"; llama.cpp refuses a mismatch),
            general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32).
            llama.cpp scales each pair by alpha / rank, rank = lora_b's ne[0]; rsLoRA (alpha / sqrt(r)) is
            written as alpha * sqrt(r) so that llama.cpp's alpha / r gives the same scale.
  tensors   "<base tensor name>.lora_a" / ".lora_b" in llama.cpp's naming (blk.N.attn_q.weight, ...), one pair
            per adapted projection. GGUF shapes are innermost-first: lora_a ne = [in, r], lora_b ne = [r, out].
            gguf-py writes a numpy array's last axis as ne[0], so these are PEFT's own A (r, in) and B (out, r),
            untransposed. Written float32 (exact; an adapter is a few MB).
  llama Q/K llama-architecture GGUFs store q_proj/k_proj rows permuted per head (adjacent rotary pairs;
            engine/loading/weights.py undoes it on load). The adapter's delta B A adds to those rows, so B's rows get the
            same permutation (A acts on the input side and is left alone). qwen2 files are not permuted.

Every tensor is checked against the base GGUF's shapes before anything is written; a mismatch is one line naming
the adapter tensor, its shape and the base tensor's. The file is written to a temporary name, then renamed.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from engine.loading.weights import _GGUF_LAYER_NAMES, gguf_config, gguf_metadata, open_gguf
from engine.lora import PEFT_PREFIX, read_peft

_HF_TO_GGUF = {hf: gg for gg, hf in _GGUF_LAYER_NAMES.items()}         # "self_attn.q_proj" -> "attn_q"
_PEFT_KEY = re.compile(re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight")


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k row order -> llama.cpp's: per head, rows [half0 | half1] become interleaved pairs
    (r0, r_hd/2, r1, r_hd/2+1, ...). The inverse of engine.loading.weights._unpermute. w: (out, ...)."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _base_shapes(model) -> tuple[object, dict[str, tuple[int, ...]], Path]:
    """(ModelConfig, GGUF tensor name -> torch-order shape, path) of the base GGUF `model` (name or file)."""
    from engine.loading.hub import resolve
    path = resolve(model)
    st = path.stat()
    return _read_base(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_base(path: Path, size: int, mtime_ns: int):
    """Parsing a GGUF header costs seconds (gguf-py walks every vocabulary string), so exporting several adapters
    for one base parses it once; size and mtime in the key notice a replaced file."""
    if path.is_dir():
        raise ValueError(f"{path}: llama.cpp runs adapters on a GGUF base; pass the .gguf file (or an embedded "
                         f"model name) the adapter will be used with")
    reader = open_gguf(path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    vocab = shapes.get("token_embd.weight", (0,))[0]
    cfg = gguf_config(gguf_metadata(reader), vocab_size=vocab, has_output="output.weight" in shapes, source=str(path))
    return cfg, shapes, path


def adapter_to_gguf_tensors(adapter_dir, cfg, shapes: dict[str, tuple[int, ...]], model_label: str
                            ) -> tuple[dict[str, np.ndarray], float]:
    """Read a PEFT adapter directory and return ({gguf name: float32 array}, alpha as llama.cpp wants it)."""
    lcfg, tensors = read_peft(adapter_dir)
    w_path = Path(adapter_dir) / "adapter_model.safetensors"
    for field in ("rank_pattern", "alpha_pattern"):
        if lcfg.get(field):
            raise ValueError(f"{Path(adapter_dir) / 'adapter_config.json'}: {field} is set; llama.cpp's format "
                             f"holds one alpha per file, so per-module ranks/alphas cannot be exported")
    rank, alpha = int(lcfg["r"]), float(lcfg["lora_alpha"])
    out: dict[str, np.ndarray] = {}
    for key, t in sorted(tensors.items()):
        m = _PEFT_KEY.fullmatch(key)
        if m is None or m.group(2) not in _HF_TO_GGUF:
            raise ValueError(f"{w_path}: tensor {key!r} is not a LoRA A/B of a decoder projection "
                             f"(expected {PEFT_PREFIX}model.layers.N.<self_attn|mlp>.<proj>.lora_A|B.weight)")
        layer, proj, which = int(m.group(1)), m.group(2), m.group(3)
        base = f"blk.{layer}.{_HF_TO_GGUF[proj]}.weight"
        hf_base = f"model.layers.{layer}.{proj}.weight"
        if base not in shapes:
            raise ValueError(f"{w_path}: tensor {key!r} adapts {hf_base} ({base}), which {model_label} does not "
                             f"have ({cfg.n_layers} layers): the adapter was made for another base model")
        n_out, n_in = shapes[base]
        want = (rank, n_in) if which == "A" else (n_out, rank)
        if tuple(t.shape) != want:
            raise ValueError(f"{w_path}: tensor {key!r} has shape {tuple(t.shape)}, but {model_label}'s {hf_base} "
                             f"({base}) is {(n_out, n_in)}, so lora_{which} must be {want}: the adapter was made "
                             f"for another base model")
        w = t.detach().to(torch.float32)
        if which == "B" and cfg.arch == "llama" and proj in ("self_attn.q_proj", "self_attn.k_proj"):
            w = permute_rows(w, cfg.n_heads if proj == "self_attn.q_proj" else cfg.n_kv_heads)
        out[f"{base}.lora_{which.lower()}"] = w.contiguous().numpy()
    for base in sorted({n.rsplit(".", 1)[0] for n in out}):
        for part in ("lora_a", "lora_b"):
            if f"{base}.{part}" not in out:
                raise ValueError(f"{w_path}: {base} has only one of lora_A / lora_B")
    if not out:
        raise ValueError(f"{w_path}: no LoRA tensors")
    if lcfg.get("use_rslora", False):
        alpha = alpha * math.sqrt(rank)          # llama.cpp computes alpha / r; rsLoRA wants alpha / sqrt(r)
    return out, alpha


def export_gguf(adapter_dir, out_path, model="smollm2-135m") -> Path:
    """Write the PEFT adapter in `adapter_dir` as a llama.cpp GGUF LoRA adapter for base `model` (an embedded
    name or a .gguf file). Returns the path written."""
    import gguf
    cfg, shapes, base_path = _base_shapes(model)
    tensors, alpha = adapter_to_gguf_tensors(adapter_dir, cfg, shapes, model_label=str(base_path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), cfg.arch)           # writes general.architecture
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter_dir).name)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def cli_export(args) -> int:
    adapter_dir, out_path = args.gguf
    out = export_gguf(adapter_dir, out_path, model=args.model)
    print(f"wrote {out} (llama.cpp LoRA adapter for {args.model}; load with --lora {out})")
    return 0
