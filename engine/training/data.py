"""Role-tagged SFT data: JSONL -> token ids + loss masks -> role-balanced, role-grouped batches.

One example per line, any mix of the four roles in one file:

    {"role": "planner", "messages": [{"role": "system", "content": "..."},
                                     {"role": "user", "content": "..."},
                                     {"role": "assistant", "content": "..."}]}

    from engine.training.data import read_sft, load_sft, split_eval, RoleSampler, collate
    rows = read_sft("recipes/data/mini_sft.jsonl", roles=ROLES)   # validated, no tokenizer needed
    data = load_sft("recipes/data/mini_sft.jsonl", tok, roles=ROLES, max_len=1024, rows=rows)
    train, held_out = split_eval(data.examples, eval_fraction=0.05, seed=0)
    sampler = RoleSampler(train, n_roles=4, mode="uniform", seed=0)
    batch = collate(sampler.draw(16))          # tokens/targets/loss_mask (B, T), adapter_ids (B,)

Tokenisation goes through the chat template (`tok.chat_ids_and_mask(messages) -> (ids, mask)`, mask = 1
on assistant content tokens and their closing <|im_end|>), so the loss sees only what the role writes.
Next-token targets: tokens = ids[:-1], targets = ids[1:], loss_mask = mask[1:].

Over-long examples keep their first `max_len` tokens and are counted (`LoadStats.truncated`); an example
whose assistant tokens are all cut off is dropped and counted (`LoadStats.dropped`). The characters are capped
before tokenising (`cap_chars`), so one huge line costs what max_len tokens cost.

Sampling is a pure function of (seed, cursor): each role's stream is a fresh permutation per epoch,
drawn from numpy's PCG64 seeded with (seed, role, epoch), so `state_dict()` is a handful of integers and
restoring it reproduces the exact same batches. Within a batch, examples are sorted by adapter id so each
role's tokens are contiguous (the multi-LoRA kernel works on contiguous per-adapter segments).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from engine.roles import ROLES

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    role_id: int               # adapter id = index of the role in the run's role list
    ids: list[int]             # chat-template token ids (<= max_len)
    mask: list[int]            # 1 where the token is assistant output (trained on)
    where: str                 # "file:line", for messages about this example
    truncated: bool = False

    @cached_property
    def n_loss(self) -> int:
        return sum(self.mask[1:])                                   # trained targets (targets are ids[1:])


@dataclass
class LoadStats:
    per_role: dict[str, int] = field(default_factory=dict)         # examples kept, per role
    truncated: int = 0                                              # longer than max_len, cut to max_len
    dropped: int = 0                                                # no assistant token left after the cut
    tokens: int = 0


@dataclass
class SFTData:
    examples: list[Example]
    roles: tuple[str, ...]
    stats: LoadStats


def _field_error(where: str, fld: str, msg: str) -> ValueError:
    return ValueError(f"{where}: field {fld!r}: {msg}")


def parse_line(line: str, where: str, roles) -> tuple[str, list[dict]]:
    """Validate one JSONL line; return (role, messages). Errors name file:line and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
    except ValueError as e:                     # e.g. an integer of more than 4300 digits
        raise ValueError(f"{where}: unreadable JSON: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested deeper than the reader allows") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with fields 'role' and 'messages', got {type(obj).__name__}")
    if "role" not in obj:
        raise _field_error(where, "role", "missing")
    role = obj["role"]
    if role not in roles:
        raise _field_error(where, "role", f"unknown role {role!r}; expected one of {list(roles)}")
    msgs = obj.get("messages")
    if msgs is None:
        raise _field_error(where, "messages", "missing")
    if not isinstance(msgs, list) or not msgs:
        raise _field_error(where, "messages", "expected a non-empty list of {role, content} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _field_error(where, f"messages[{i}]", f"expected an object, got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise _field_error(where, f"messages[{i}].role", f"{m.get('role')!r}; expected one of {list(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _field_error(where, f"messages[{i}].content", "missing or not a string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise _field_error(where, f"messages[{i}].content", f"a lone surrogate at character {e.start} "
                               f"(\\u{ord(m['content'][e.start]):04x} escapes half of a pair): not Unicode text") from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise _field_error(where, "messages", "no assistant turn: nothing to train on")
    return role, msgs


def read_sft(path: str | Path, roles=ROLES) -> list[tuple[str, str, list[dict]]]:
    """Read + validate a role-tagged JSONL file without a tokenizer (so a run can check its data before the model
    loads): [(where "file:line", role, messages)], blank lines skipped. Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SFT data file not found")
    roles = tuple(roles)
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"JSONL must be UTF-8 (re-encode it, e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            role, msgs = parse_line(line, where, roles)
            rows.append((where, role, msgs))
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return rows


def load_sft(path: str | Path, tok, roles=ROLES, max_len: int = 2048, rows=None) -> SFTData:
    """Read + validate + tokenise a role-tagged JSONL file (blank lines are skipped). `rows`: read_sft(path, roles)
    already done (the trainer checks the data before it loads the model)."""
    roles = tuple(roles)
    rows = read_sft(path, roles) if rows is None else rows
    stats = LoadStats(per_role={r: 0 for r in roles})
    examples = []
    per_token = getattr(tok, "max_token_chars", None)
    cap = max_len * (per_token + 1) + 4096 if per_token else None
    for where, role, msgs in rows:
        msgs, cut = cap_chars(msgs, cap)
        ids, mask = tok.chat_ids_and_mask(msgs)
        ids, mask = list(ids), list(mask)
        truncated = len(ids) > max_len or cut
        if truncated:
            ids, mask = ids[:max_len], mask[:max_len]
            stats.truncated += 1
        ex = Example(roles.index(role), ids, mask, where, truncated)
        if ex.n_loss == 0:
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.per_role[role] += 1
        stats.tokens += len(ids)
    if not examples:
        raise ValueError(f"{path}: no usable examples (dropped {stats.dropped} whose assistant turn fell past max_len)")
    return SFTData(examples, roles, stats)


def cap_chars(msgs: list[dict], cap: int | None) -> tuple[list[dict], bool]:
    """The conversation cut to `cap` characters of content (later turns dropped, the last one kept cut) BEFORE it
    is tokenised: a 50 MB line would otherwise be tokenised whole (11 GB, 89 s) to keep max_len tokens. load_sft's
    cap, max_len x (the longest token's characters + 1) + 4096, is beyond where the first max_len tokens end.
    Returns (messages, whether anything was cut)."""
    if cap is None or sum(len(m["content"]) for m in msgs) <= cap:
        return msgs, False
    out, left = [], cap
    for m in msgs:
        if left <= 0:
            break
        out.append(dict(m, content=m["content"][:left]))
        left -= len(m["content"])
    return out, True


def split_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Held-out split per role: round(fraction * n_role) examples of each role (>= 1 when the fraction > 0
    and the role has >= 2 examples), picked by a seeded permutation; file order kept within each split."""
    by_role: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_role.setdefault(e.role_id, []).append(i)
    held = set()
    for r, idx in sorted(by_role.items()):
        n_eval = int(round(eval_fraction * len(idx)))
        if eval_fraction > 0 and len(idx) >= 2:
            n_eval = max(1, min(n_eval, len(idx) - 1))
        perm = np.random.Generator(np.random.PCG64([seed, 7, r])).permutation(len(idx))
        held.update(idx[j] for j in perm[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


class RoleSampler:
    """Endless, deterministic example stream that balances roles.

    mode "uniform":      every batch gives each role n // R slots; the n % R leftover slots go to roles
                         drawn without replacement (seeded by the batch index). Small roles repeat sooner.
    mode "proportional": one stream over all examples (each epoch a permutation), so roles appear in
                         proportion to their data.
    Cursor = (batch index, per-stream (epoch, position)); permutations are recomputed from (seed, stream, epoch).
    """

    def __init__(self, examples: list[Example], n_roles: int, mode: str = "uniform", seed: int = 0):
        if mode not in ("uniform", "proportional"):
            raise ValueError(f"sampler mode {mode!r}; expected 'uniform' or 'proportional'")
        if not examples:
            raise ValueError("RoleSampler: no training examples")
        self.mode, self.seed = mode, seed
        if mode == "uniform":
            self.streams = {r: [e for e in examples if e.role_id == r] for r in range(n_roles)}
            self.streams = {r: s for r, s in self.streams.items() if s}   # roles without data get no slots
        else:
            self.streams = {-1: list(examples)}
        self.cursor = {r: [0, 0] for r in self.streams}                    # stream -> [epoch, position]
        self.batch_index = 0
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, stream: int, epoch: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 16:
                self._perm_cache.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, 11, stream + 1, epoch]))
            self._perm_cache[key] = rng.permutation(len(self.streams[stream]))
        return self._perm_cache[key]

    def _take(self, stream: int, k: int) -> list[Example]:
        out, data, cur = [], self.streams[stream], self.cursor[stream]
        for _ in range(k):
            if cur[1] == len(data):
                cur[0], cur[1] = cur[0] + 1, 0
            out.append(data[self._perm(stream, cur[0])[cur[1]]])
            cur[1] += 1
        return out

    def draw(self, n: int) -> list[Example]:
        """The next n examples (a global batch), in sampling order."""
        if self.mode == "proportional":
            out = self._take(-1, n)
        else:
            roles = sorted(self.streams)
            counts = {r: n // len(roles) for r in roles}
            extra = n % len(roles)
            if extra:
                rng = np.random.Generator(np.random.PCG64([self.seed, 13, self.batch_index]))
                for j in rng.choice(len(roles), size=extra, replace=False):
                    counts[roles[j]] += 1
            # Interleave roles so that any contiguous slice of the batch (a rank's share, a micro-batch)
            # stays mixed: round-robin over roles until each has its count.
            taken = {r: self._take(r, counts[r]) for r in roles}
            out = []
            while any(taken.values()):
                for r in roles:
                    if taken[r]:
                        out.append(taken[r].pop(0))
        self.batch_index += 1
        return out

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "batch_index": self.batch_index,
                "cursor": {str(k): list(v) for k, v in self.cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode or state["seed"] != self.seed:
            raise ValueError(f"data cursor was saved with mode={state['mode']!r} seed={state['seed']}; "
                             f"this run has mode={self.mode!r} seed={self.seed}")
        cursor = {int(k): v for k, v in state["cursor"].items()}
        if set(cursor) != set(self.cursor):
            raise ValueError(f"data cursor covers streams {sorted(cursor)}, this data has {sorted(self.cursor)}")
        self.cursor = {k: list(v) for k, v in cursor.items()}
        self.batch_index = int(state["batch_index"])


@dataclass
class Batch:
    tokens: torch.Tensor       # (B, T) int64 inputs, right-padded with pad_id
    targets: torch.Tensor      # (B, T) int64 next tokens (pad positions arbitrary, masked out)
    loss_mask: torch.Tensor    # (B, T) float32, 1 on assistant targets
    adapter_ids: torch.Tensor  # (B,) int64, non-decreasing: each role's rows are contiguous
    n_real: int                # non-pad input tokens (for tokens/s)

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.loss_mask.to(device),
                     self.adapter_ids.to(device), self.n_real)


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Examples -> one padded batch, rows sorted by adapter id (stable), padded to the longest row."""
    examples = sorted(examples, key=lambda e: e.role_id)
    B, T = len(examples), max(len(e.ids) for e in examples) - 1
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids, dtype=torch.long)
        tokens[i, :n], targets[i, :n] = ids[:-1], ids[1:]
        mask[i, :n] = torch.tensor(e.mask[1:], dtype=torch.float32)
    adapter_ids = torch.tensor([e.role_id for e in examples], dtype=torch.long)
    return Batch(tokens, targets, mask, adapter_ids, sum(len(e.ids) - 1 for e in examples))
