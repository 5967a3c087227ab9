"""The tokenizer: a thin wrapper over Hugging Face `tokenizers` (byte-level BPE) plus the chat template.

    from engine.loading.tokenizer import Tokenizer
    tok = Tokenizer.from_file("hf_dir/tokenizer.json")       # reads tokenizer_config.json beside it if present
    tok = Tokenizer.from_gguf(metadata)                      # metadata from engine.loading.weights.load_gguf
    ids = tok.encode("def f(x):")                            # list[int]; special tokens in the text are parsed
    text = tok.decode(ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids, mask = tok.chat_ids_and_mask(messages)              # mask=1 on assistant content + its closing <|im_end|>
    stream = tok.decode_stream(); for i in ids: print(stream.step(i), end="")

Building from GGUF follows llama.cpp's reading of the metadata: the vocabulary (tokenizer.ggml.tokens), the merges,
token types (3 = CONTROL -> special added token, 4 = USER_DEFINED -> plain added token), and the pre-tokenizer
named by tokenizer.ggml.pre (how text is split before BPE, which must match how the merges were learned):
    smollm (also starcoder, refact, codeshell): every digit alone, then GPT-2's regex
    qwen2:     NFC, then Qwen2's regex (single digits, letters with one leading non-letter, ...)
    llama-bpe: Llama-3's regex (digits in runs of up to 3)
    gpt-2 / default: GPT-2's regex
(transformers' own GGUF loader falls back to GPT-2's regex for "smollm", so it splits "2024" differently from
llama.cpp and from SmolLM2's own tokenizer.json; we follow llama.cpp.)

Chat templates are rendered with jinja2 from the model's own template string (GGUF `tokenizer.chat_template` or
tokenizer_config.json `chat_template`), in a sandbox configured like transformers' apply_chat_template, so each
family's default-system-prompt rule is exactly its template's. Without a template we use plain ChatML.
"""
from __future__ import annotations

import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Split patterns (public constants of the respective tokenizers).
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_QWEN2 = ("qwen2", "deepseek-r1-qwen")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")
_GPT2 = ("gpt-2", "gpt2", "default", "mpt", "olmo", None)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_level_pipeline(tk: tokenizers.Tokenizer, pre: str | None, source: str) -> None:
    """Set normalizer / pre-tokenizer / decoder for llama.cpp pre-tokenizer type `pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _QWEN2:
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_PAT), "isolated"), byte_level])
    elif pre in _LLAMA3:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_PAT), "isolated"), byte_level])
    elif pre in _GPT2:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        known = _DIGITS_THEN_GPT2 + _QWEN2 + _LLAMA3 + _GPT2[:-1]
        raise ValueError(f"{source}: unknown tokenizer.ggml.pre={pre!r}; supported: {', '.join(known)}")
    tk.decoder = decoders.ByteLevel()


@lru_cache(maxsize=8)
def _compile_template(template: str):
    """A jinja2 template in a sandbox set up like transformers' apply_chat_template (trim/lstrip blocks,
    loop controls, a non-HTML-escaping tojson, raise_exception)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Bounded(ImmutableSandboxedEnvironment):
        """`*` and `**` checked before they run: 'x' * 10**10 or 10 ** 10**8 would allocate or compute for minutes."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            sized = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
            num = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
            if operator == "*" and sized and num and len(sized[0]) * max(num[0], 0) > TEMPLATE_MAX_CHARS:
                raise jinja2.exceptions.SecurityError("chat template: a repetition beyond the output limit")
            if operator == "**" and len(num) == 2 and abs(num[1]) > 4096:
                raise jinja2.exceptions.SecurityError("chat template: an exponent beyond 4096")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


TEMPLATE_SECONDS = 5.0           # a chat template's rendering is stopped after this long (nested loops) ...
TEMPLATE_MAX_CHARS = 1 << 24     # ... or this much output


class TemplateBudget(ValueError):
    """A chat template ran past TEMPLATE_SECONDS or TEMPLATE_MAX_CHARS."""


def _render_bounded(template, source: str, **kw) -> str:
    """template.render(**kw) with a deadline and an output cap. The deadline is checked on every line the
    template's compiled code runs (a trace function on that code only; jinja2's own sandbox bounds range() but not
    nested loops), the cap on every chunk it yields."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateBudget(f"{source}: the chat template ran for more than {TEMPLATE_SECONDS:g} s")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None
    old = sys.gettrace()
    sys.settrace(call)
    try:
        out, n = [], 0
        for chunk in template.generate(**kw):
            n += len(chunk)
            if n > TEMPLATE_MAX_CHARS:
                raise TemplateBudget(f"{source}: the chat template rendered more than {TEMPLATE_MAX_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(old)


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte alphabet read backwards: the character byte-level BPE writes for each byte -> the byte. Printable
    Latin-1 bytes stand for themselves; the other 68 bytes are the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


class StreamDecoder:
    """Incremental decoding for streaming: step(id) returns the new text ('' while a multi-byte character is
    still incomplete). One per generated sequence."""

    def __init__(self, tk: tokenizers.Tokenizer, skip_special: bool = True):
        self._tk = tk
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tk, int(token_id)) or ""


class Tokenizer:
    """Byte-level BPE tokenizer + chat template. Attributes others rely on: bos_id, eos_id, eos_ids (set of ids
    that end a turn: eos, <|im_end|>, <|endoftext|> where present), pad_id, vocab_size, chat_template."""

    def __init__(self, tk: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, add_bos: bool = False,
                 source: str = "tokenizer"):
        self.tk = tk
        self.source = source
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(pad_token)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.eos_ids = {i for i in (self.eos_id, self._id("<|im_end|>"), self._id("<|endoftext|>")) if i is not None}
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its byte-level string's length; added tokens too)."""
        if not hasattr(self, "_max_token_chars"):
            self._max_token_chars = max(map(len, self.tk.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    # --- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json, tokenizer_config=None) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json, default: the one beside it, and chat_template.jinja if the
        config has no chat_template, as transformers >= 4.50 saves it)."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizers JSON file: {e}") from None
        cfg_path = Path(tokenizer_config) if tokenizer_config else path.parent / "tokenizer_config.json"
        cfg = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
            except (RecursionError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path}: not a tokenizer config ({type(e).__name__}: nested too deep or not "
                                 f"UTF-8)") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object, got a {type(cfg).__name__}")
        elif tokenizer_config:
            raise FileNotFoundError(f"{cfg_path}: no such file")

        def token(key):
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        template = cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tk, bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
                   chat_template=template, add_bos=bool(cfg.get("add_bos_token", False)), source=str(path))

    @classmethod
    def from_gguf(cls, meta: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """From the metadata dict of engine.loading.weights.load_gguf (byte-level BPE, tokenizer.ggml.model == 'gpt2')."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2') is supported")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise ValueError(f"{source}: missing metadata key {key!r}")
        tokens, raw_merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        for key, v in (("tokens", tokens), ("merges", raw_merges), ("token_type", types)):
            kind = int if key == "token_type" else str
            bad = next((i for i, x in enumerate(v) if not isinstance(x, kind)), None) if isinstance(v, list) else -1
            if bad is not None:
                raise ValueError(f"{source}: metadata key 'tokenizer.ggml.{key}'" +
                                 (f"[{bad}] = {v[bad]!r}" if bad >= 0 else f" = {type(v).__name__}") +
                                 f": expected a list of {kind.__name__}")
        if len(types) != len(tokens):
            raise ValueError(f"{source}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries for "
                             f"{len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2 or not all(m) or m[0] not in vocab or
                    m[1] not in vocab or m[0] + m[1] not in vocab), None)
        if bad is not None:
            raise ValueError(f"{source}: metadata key 'tokenizer.ggml.merges'[{bad}] = {raw_merges[bad]!r}: expected "
                             f"'A B' where A, B and AB are tokens of the vocabulary")
        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        _byte_level_pipeline(tk, meta.get("tokenizer.ggml.pre"), source)
        # Added tokens keep their vocabulary ids; CONTROL ones are special (skipped by decode(skip_special=True)).
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == 3])
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

        def token(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(tk, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                   pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), source=source)

    def save(self, outdir) -> None:
        """tokenizer.json + tokenizer_config.json (chat template, bos/eos/pad), loadable by AutoTokenizer."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(out / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token, "eos_token": self.eos_token,
               "pad_token": self.pad_token, "add_bos_token": self.add_bos, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # --- text <-> ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. '<|im_end|>') become their ids.
        add_special prepends BOS when the model asks for one (tokenizer add_bos_token)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_stream(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self.tk, skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (the logprobs of the HTTP server report them): an added or special token's
        text; a byte-level token's vocabulary string read back through GPT-2's byte alphabet (so a token holding
        half of a UTF-8 character gives that half); otherwise its decoded text. b'' for an id not in the vocabulary."""
        s = self.tk.id_to_token(int(token_id))
        if s is None:
            return b""
        if not hasattr(self, "_added_ids"):
            self._added_ids = set(self.tk.get_added_tokens_decoder())
        byte_of = _byte_of_char()
        if int(token_id) in self._added_ids:
            return s.encode("utf-8")
        if all(c in byte_of for c in s):
            return bytes(byte_of[c] for c in s)
        return self.decode([int(token_id)], skip_special=False).encode("utf-8")

    # --- chat ----------------------------------------------------------------------------------------------
    def chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the model's chat template (ChatML when it has none), bounded in time and
        size (TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS: a template is part of the model file)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected a dict with string 'role' and 'content', got {m!r}")
        template = _compile_template(self.chat_template or CHATML)
        return _render_bounded(template, f"{self.source}: chat template", messages=messages,
                               add_generation_prompt=add_generation_prompt, tools=None,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (what transformers' apply_chat_template(tokenize=True) gives),
        except that special-token text inside a message's content stays text: only the template's own markers
        become control tokens (a user typing '<|im_start|>system' gets those characters, not a system turn)."""
        text = self.chat_text(messages, add_generation_prompt)
        return self._encode_chat(text, messages)[0]

    def _specials(self) -> list[str]:
        if not hasattr(self, "_special_texts"):
            self._special_texts = [t.content for t in self.tk.get_added_tokens_decoder().values() if t.special]
        return self._special_texts

    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special-token text as text (made once; the shared one is untouched)."""
        if not hasattr(self, "_plain_tk"):
            tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
            tk.encode_special_tokens = True
            self._plain_tk = tk
        return self._plain_tk

    def _encode_chat(self, text: str, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]], list]:
        """(ids, offsets, spans) of a rendered conversation: spans[i] = (start, end) of messages[i]'s content in
        `text`, found in order from where the previous message's content ended (None where the template did not
        render it verbatim). Contents holding special-token text are encoded with special-token parsing off."""
        spans, cursor = [], 0
        for m in messages:
            at = text.find(m["content"], cursor)
            spans.append(None if at < 0 else (at, at + len(m["content"])))
            if at >= 0:
                cursor = at + len(m["content"])
        specials = self._specials()
        plain = []
        for i, m in enumerate(messages):
            if any(sp in m["content"] for sp in specials):
                if spans[i] is None:
                    raise ValueError(f"messages[{i}]: the content holds special-token text and the chat template "
                                     f"does not render it verbatim, so it cannot be kept as text")
                plain.append(spans[i])
        if not plain:
            enc = self.tk.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets, spans
        ids, offsets, pos = [], [], 0
        for a, b in plain + [(len(text), len(text))]:
            for piece, start, tk in ((text[pos:a], pos, self.tk), (text[a:b], a, self._plain())):
                if piece:
                    enc = tk.encode(piece, add_special_tokens=False)
                    ids += enc.ids
                    offsets += [(start + x, start + y) for x, y in enc.offsets]
            pos = b
        return ids, offsets, spans

    def chat_ids_and_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) for SFT: ids = apply_chat_template(messages); mask[i] = 1 exactly on the tokens of each
        assistant turn's content and its closing <|im_end|> (a token counts if its characters overlap that span).
        Each turn is located by position (messages in order, each searched from where the previous one ended), so
        a user turn quoting the answer does not move the mask. Needs a ChatML template
        (<|im_start|>assistant\n{content}<|im_end|>)."""
        text = self.chat_text(messages)
        ids, offsets, spans = self._encode_chat(text, messages)
        head, tail = "<|im_start|>assistant\n", "<|im_end|>"
        masked, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                cursor = spans[i][1] if spans[i] is not None else cursor
                continue
            at = text.find(head + m["content"] + tail, cursor)    # after the previous message's content
            sp = None if at < 0 else (at + len(head), at + len(head) + len(m["content"]))
            if sp is None:
                raise ValueError(f"messages[{i}]: the chat template did not render this assistant turn as "
                                 f"ChatML ('<|im_start|>assistant\\n...<|im_end|>'); cannot build its loss mask")
            masked.append((sp[0], sp[1] + len(tail)))
            cursor = sp[1] + len(tail)
        mask = [0] * len(ids)
        for j, (a, b) in enumerate(offsets):
            if any(a < hi and b > lo for lo, hi in masked):
                mask[j] = 1
        return ids, mask
