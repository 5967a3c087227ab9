"""Model configuration: one dataclass for the Llama / Qwen2 decoder family, plus presets.

    from engine.config import PRESETS, ModelConfig
    cfg = PRESETS["smollm2-135m"]            # shapes of a real model
    cfg = ModelConfig.from_hf_dict(json.load(open("config.json")), source="config.json")

The presets carry shapes only; weights come from engine.loading.weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "qwen2")
_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_kind(v) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"                # "llama" or "qwen2": qwen2 adds a bias to q/k/v
    vocab_size: int = 49152
    dim: int = 576                     # hidden size
    n_layers: int = 30
    n_heads: int = 9                   # query heads
    n_kv_heads: int = 3                # key/value heads (grouped-query attention when < n_heads)
    intermediate_size: int = 1536      # SwiGLU hidden size
    head_dim: int = 0                  # 0 means dim // n_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 2048            # positions the KV cache and RoPE table cover
    tie_embeddings: bool = True        # lm_head shares the token embedding matrix
    qkv_bias: bool = False             # True for qwen2

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"ModelConfig.{name}={v!r}: expected a positive integer")
        if not _is_int(self.head_dim) or self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim!r}: expected an even integer (RoPE rotates halves)"
                             f", or 0 for dim // n_heads")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide dim={self.dim}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
            if self.head_dim % 2:
                raise ValueError(f"dim // n_heads = {self.head_dim} is odd; RoPE needs an even head size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("rope_theta", "rms_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"ModelConfig.{name}={v!r}: expected a positive finite number")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- HF config.json <-> ModelConfig -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a transformers config.json dict; `source` names the file in errors. Every field is checked
        here, by its config.json name, so a bad value is blamed on this file (not on the weights it describes)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of model fields, got a JSON {_json_kind(d)}")
        model_type = d.get("model_type")
        archs = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}
        if model_type not in archs:
            raise ValueError(f"{source}: unknown architecture model_type={model_type!r}; "
                             f"supported: {', '.join(sorted(archs))}")

        def get(key, kind, default=_REQUIRED):
            v = d.get(key)
            if v is None:                                   # absent or null: the default, if the field has one
                if default is _REQUIRED:
                    raise ValueError(f"{source}: missing field {key!r}")
                return default
            ok = (_is_int(v) and v > 0 if kind == "int" else
                  isinstance(v, bool) if kind == "bool" else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
            if not ok:
                want = {"int": "a positive integer", "bool": "true or false"}.get(kind, "a positive finite number")
                raise ValueError(f"{source}: field {key!r} = {json.dumps(v)}: expected {want}")
            return v

        dim, n_heads = get("hidden_size", "int"), get("num_attention_heads", "int")
        n_kv = get("num_key_value_heads", "int", n_heads)
        if dim % n_heads:
            raise ValueError(f"{source}: field 'num_attention_heads' = {n_heads} does not divide "
                             f"'hidden_size' = {dim}")
        if n_heads % n_kv:
            raise ValueError(f"{source}: field 'num_key_value_heads' = {n_kv} does not divide "
                             f"'num_attention_heads' = {n_heads}")
        head_dim = get("head_dim", "int", dim // n_heads)
        if head_dim % 2:
            raise ValueError(f"{source}: head size {head_dim} (field 'head_dim', or hidden_size // "
                             f"num_attention_heads) is odd; RoPE needs an even head size")
        # transformers >= 5 stores rope_theta under rope_parameters
        rope = d.get("rope_parameters")
        theta = get("rope_theta", "float", None)
        if theta is None and isinstance(rope, dict) and rope.get("rope_theta") is not None:
            theta = rope["rope_theta"]
            if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
                raise ValueError(f"{source}: field 'rope_parameters.rope_theta' = {json.dumps(theta)}: "
                                 f"expected a positive finite number")
        try:
            return cls(
                arch=archs[model_type],
                vocab_size=get("vocab_size", "int"),
                dim=dim,
                n_layers=get("num_hidden_layers", "int"),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                intermediate_size=get("intermediate_size", "int"),
                head_dim=head_dim,
                rope_theta=float(10000.0 if theta is None else theta),
                rms_eps=float(get("rms_norm_eps", "float", 1e-6)),
                max_seq_len=get("max_position_embeddings", "int", 2048),
                tie_embeddings=get("tie_word_embeddings", "bool", False),
                qkv_bias=archs[model_type] == "qwen2" or get("attention_bias", "bool", False),
            )
        except ValueError as e:                             # a rule of __post_init__ not checked above
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        hf_arch = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}[self.arch]
        d = {
            "model_type": hf_arch[0], "architectures": [hf_arch[1]],
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size, "head_dim": self.head_dim,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32",
        }
        if self.arch == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        return d


PRESETS: dict[str, ModelConfig] = {
    # Paper's student: shapes only (speed work uses random weights of these shapes).
    "qwen2.5-7b-instruct": ModelConfig(arch="qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                                       n_kv_heads=4, intermediate_size=18944, rope_theta=1e6, rms_eps=1e-6,
                                       max_seq_len=32768, tie_embeddings=False, qkv_bias=True),
    "qwen2.5-coder-0.5b": ModelConfig(arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                                      n_kv_heads=2, intermediate_size=4864, rope_theta=1e6, rms_eps=1e-6,
                                      max_seq_len=32768, tie_embeddings=True, qkv_bias=True),
    "qwen2.5-coder-1.5b": ModelConfig(arch="qwen2", vocab_size=151936, dim=1536, n_layers=28, n_heads=12,
                                      n_kv_heads=2, intermediate_size=8960, rope_theta=1e6, rms_eps=1e-6,
                                      max_seq_len=32768, tie_embeddings=True, qkv_bias=True),
    # The embedded default model.
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                intermediate_size=1536, rope_theta=100000.0, rms_eps=1e-5, max_seq_len=8192,
                                tie_embeddings=True),
    # Unit tests.
    "tiny": ModelConfig(arch="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=128, rope_theta=10000.0, rms_eps=1e-5, max_seq_len=256,
                        tie_embeddings=False),
}
