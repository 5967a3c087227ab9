"""Test fixtures for tests/train: a 256-token byte-level chat tokenizer (the real engine.loading.tokenizer.Tokenizer over a
`tokenizers` byte-level BPE with no merges), the tiny random model, a 64-example memorisation set, recipe files,
and a reader for W&B's offline .wandb record log.

    from tiny_setup import byte_tokenizer, tiny_model, memorisation_rows, write_jsonl, write_recipe
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from engine.config import PRESETS
from engine.model import Transformer
from engine.roles import ROLES

SPECIALS = ("<|im_start|>", "<|im_end|>")


def byte_tokenizer():
    """ByteLevel alphabet for bytes 0..253 plus the two ChatML specials = exactly 256 ids (the tiny vocab).
    Bytes 0xFE/0xFF never occur in UTF-8 text, so every string encodes."""
    from tokenizers import AddedToken, Tokenizer as TK, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from engine.loading.tokenizer import Tokenizer
    alphabet = sorted(ByteLevel.alphabet())                       # the 256 printable stand-ins of GPT-2
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(254)}
    tk = TK(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert len(alphabet) == 256 and tk.get_vocab_size() == 256
    return Tokenizer(tk, eos_token="<|im_end|>", pad_token=None, source="byte_tokenizer")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_model(seed: int = 0, head_std: float = 0.15) -> Transformer:
    """The tiny preset with random weights (std 0.02) and a wider output head: with a std-0.02 head the logits of a
    LoRA-only model stay within about |h| |w_row| = 8 x 0.16 ~ 1.3, so its loss cannot fall far below ln(256) = 5.5."""
    model = Transformer(PRESETS["tiny"]).init_weights(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, head_std, generator=torch.Generator().manual_seed(seed + 1))
    return model


ANSWERS = {
    "retriever": "<algorithm>binary search</algorithm> #{i}",
    "planner": "1. read input 2. sort {i} 3. print",
    "coder": "def f(x):\n    return x + {i}",
    "debugger": "fixed: off by one in line {i}",
}


def memorisation_rows(n_per_role: int = 16, roles=ROLES) -> list[dict]:
    """n_per_role examples per role, roles interleaved, short (~60-80 bytes)."""
    rows = []
    for i in range(n_per_role):
        for r in roles:
            rows.append({"role": r, "messages": [
                {"role": "system", "content": r},
                {"role": "user", "content": f"task {i}"},
                {"role": "assistant", "content": ANSWERS[r].format(i=i)}]})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_recipe(path: Path, tables: dict) -> Path:
    """A recipe TOML from {table: {key: value}} (strings, numbers, bools, lists of strings)."""
    def lit(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return json.dumps(str(v))
    lines = ["# python tests/train/run_tiny.py THIS.toml"]
    for t, kv in tables.items():
        lines.append(f"[{t}]")
        lines += [f"{k} = {lit(v)}" for k, v in kv.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_tables(out_dir: Path, data: Path, **train) -> dict:
    t = {"out_dir": str(out_dir), "steps": 12, "global_batch": 8, "micro_batch": 4, "lr": 5e-3, "warmup_steps": 2,
         "log_every": 1, "seed": 0}
    t.update(train)
    return {"model": {"name": "random:tiny", "device": "cpu"}, "lora": {"rank": 8, "alpha": 16.0},
            "data": {"path": str(data), "max_len": 128, "eval_fraction": 0.0}, "train": t,
            "wandb": {"mode": "disabled"}}


def read_adapters(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for d in sorted(Path(root).iterdir()):
        for k, v in load_file(str(d / "adapter_model.safetensors")).items():
            out[f"{d.name}/{k}"] = v
    return out


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file (W&B's LevelDB-style log: 7-byte header ':W&B' + magic + version, then 32 KiB
    blocks of chunks [crc32 u32, length u16, type u8] + data; type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    records, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:                                              # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):                           # a chunk still being written
            break
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records
