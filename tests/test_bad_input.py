"""Bad files and flags given to `mcl`: each one is a single error line that names the file and the field (and the
line, for JSONL), a non-zero exit, and nothing written or changed.

    python -m pytest tests/test_bad_input.py -q

Every case runs the real entry point, `engine.cli.main([...])` (one case also as `python -m engine.cli`), on a tiny
model written to disk as an HF directory. "Nothing changed" is a snapshot of every file under the test's directory
(path, size, sha256) taken before the command and compared after it. The recipe cases point model.name at a path
that does not exist: an error about the recipe or the data (not about the model) proves they are checked before
the model loads.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import cli
from engine.config import PRESETS
from engine.lora import add_adapters, save_peft
from engine.model import Transformer

sys.path.insert(0, str(Path(__file__).parent / "train"))
from tiny_setup import byte_tokenizer, memorisation_rows, tiny_tables, write_jsonl, write_recipe  # noqa: E402

ROOT = Path(cli.__file__).parents[1]                   # the engine under test, for subprocesses


def snapshot(root: Path) -> dict:
    """path -> (size, sha256) of every file under root, and every directory (so a created one shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("dir",) if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run_mcl(capsys, argv) -> tuple[int, str]:
    """engine.cli.main(argv) -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles, absent=()):
    assert code not in (0, None), f"exit code {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err and lines[0].startswith("mcl "), err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in: {lines[0]}"
    for n in absent:
        assert str(n) not in lines[0], f"{n!r} should not be blamed in: {lines[0]}"


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """The tiny preset as an HF directory: config.json, model.safetensors, tokenizer.json."""
    cfg = PRESETS["tiny"]
    model = Transformer(cfg).init_weights(seed=0)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    byte_tokenizer().save(d)
    return d


def _edit_config(hf_dir: Path, value) -> Path:
    f = hf_dir / "config.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps(value(d) if callable(value) else value))
    return f


def test_good_model_dir_generates(capsys, hf_dir):
    """The fixture itself is good: the same command with an untouched directory exits 0."""
    code, err = run_mcl(capsys, ["generate", "--model", hf_dir, "--prompt", "hi", "--max-new-tokens", "2"])
    assert code == 0, err


# --- config.json --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,edit,needles", [
    ("a list", lambda d: [d], ["config.json", "JSON object", "array"]),
    ("heads do not divide", lambda d: d | {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     ["config.json", "num_attention_heads", "3", "hidden_size", "64"]),
    ("heads do not divide, head_dim given", lambda d: d | {"num_attention_heads": 3, "num_key_value_heads": 1},
     ["config.json", "num_attention_heads", "hidden_size"]),
    ("hidden_size a string", lambda d: d | {"hidden_size": "64"}, ["config.json", "'hidden_size'", '"64"', "integer"]),
    ("vocab_size negative", lambda d: d | {"vocab_size": -1}, ["config.json", "'vocab_size'", "-1"]),
    ("rms_norm_eps a string", lambda d: d | {"rms_norm_eps": "1e-5"}, ["config.json", "'rms_norm_eps'"]),
    ("tie_word_embeddings a string", lambda d: d | {"tie_word_embeddings": "false"},
     ["config.json", "'tie_word_embeddings'", "true or false"]),
    ("kv heads do not divide heads", lambda d: d | {"num_key_value_heads": 3}, ["config.json", "num_key_value_heads"]),
])
def test_bad_config_json(capsys, tmp_path, hf_dir, case, edit, needles):
    cfg_file = _edit_config(hf_dir, edit)
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, ["generate", "--model", hf_dir, "--prompt", "hi", "--max-new-tokens", "2"])
    assert_one_line_error(code, err, cfg_file, *needles, absent=["model.safetensors"])
    assert snapshot(tmp_path) == before


def test_config_json_not_utf8(capsys, tmp_path, hf_dir):
    f = hf_dir / "config.json"
    f.write_bytes(f.read_bytes().replace(b'"llama"', b'"ll\xe4ma"'))
    code, err = run_mcl(capsys, ["generate", "--model", hf_dir, "--prompt", "hi"])
    assert_one_line_error(code, err, f, "UTF-8", "0xe4")


def test_subprocess_entry_point_bad_config(tmp_path, hf_dir):
    """The same through `python -m engine.cli`: exit 2, exactly one line on stderr, no traceback."""
    cfg_file = _edit_config(hf_dir, lambda d: d | {"hidden_size": "64"})
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--model", str(hf_dir), "--prompt", "hi"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and str(cfg_file) in p.stderr and "'hidden_size'" in p.stderr, p.stderr
    assert snapshot(tmp_path) == before


# --- mcl convert --------------------------------------------------------------------------------------------------

@pytest.fixture
def never_convert(monkeypatch):
    """Fails the test if the conversion starts: a refusal must come before the (slow) GGUF read."""
    import engine.loading.weights as W

    def boom(*a, **k):
        raise AssertionError("convert read the GGUF before checking its output directory")
    monkeypatch.setattr(W, "load_gguf", boom)


@pytest.mark.parametrize("existing", ["dir", "file"])
def test_convert_onto_existing_output_checks_first(capsys, tmp_path, never_convert, existing):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out"
    if existing == "dir":
        out.mkdir()
        (out / "config.json").write_text('{"keep": "me"}')
    else:
        out.write_text("not a directory")
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, ["convert", gguf, out])
    assert_one_line_error(code, err, out, "already exists")
    assert snapshot(tmp_path) == before


def test_convert_given_an_hf_directory(capsys, tmp_path, hf_dir):
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, ["convert", hf_dir, out])
    assert_one_line_error(code, err, hf_dir, "is a directory, not a GGUF file", "HF model directory")
    assert snapshot(tmp_path) == before and not out.exists()


# --- adapters -------------------------------------------------------------------------------------------------------

@pytest.fixture
def adapters(tmp_path) -> Path:
    """Two good role adapters (PEFT format) for the tiny model."""
    model = Transformer(PRESETS["tiny"]).init_weights(seed=0)
    add_adapters(model, ["planner", "coder"], rank=4, alpha=8.0)
    root = tmp_path / "adapters"
    for role in ("planner", "coder"):
        save_peft(model, role, root / role)
    return root


def _generate_with(hf_dir, root):
    return ["generate", "--model", hf_dir, "--adapters", root, "--adapter", "coder", "--prompt", "hi",
            "--max-new-tokens", "2"]


def test_good_adapters_generate(capsys, hf_dir, adapters):
    code, err = run_mcl(capsys, _generate_with(hf_dir, adapters))
    assert code == 0, err


@pytest.mark.parametrize("field,value,needle", [("lora_alpha", None, "positive number"),
                                                ("r", "eight", "positive integer"),
                                                ("r", 0, "positive integer"),
                                                ("target_modules", [], "module name")])
def test_bad_adapter_config(capsys, tmp_path, hf_dir, adapters, field, value, needle):
    f = adapters / "coder" / "adapter_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {field: value}))
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, _generate_with(hf_dir, adapters))
    assert_one_line_error(code, err, f, f"'{field}' = {json.dumps(value)}", needle)       # the value as in the file
    assert snapshot(tmp_path) == before


def test_role_dir_without_adapter_config_is_refused(capsys, tmp_path, hf_dir, adapters):
    """Before: the directory was skipped and the role ran on the bare base model without a word."""
    (adapters / "coder" / "adapter_config.json").unlink()
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, _generate_with(hf_dir, adapters))
    assert_one_line_error(code, err, adapters / "coder" / "adapter_config.json", "missing")
    assert snapshot(tmp_path) == before


# --- mcl train: recipe values and data, checked before the model loads ---------------------------------------------

@pytest.fixture
def train_setup(tmp_path):
    """A good recipe except that model.name points nowhere (so reaching the model load is an error of its own)."""
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2))
    tables = tiny_tables(tmp_path / "out", data, steps=2)
    tables["model"]["name"] = str(tmp_path / "no_such_model")
    return tmp_path, tables


def test_recipe_reaches_the_model_load_when_values_are_good(capsys, train_setup):
    """Control: with good values the first error is the missing model, so the cases below fail earlier."""
    tmp_path, tables = train_setup
    code, err = run_mcl(capsys, ["train", write_recipe(tmp_path / "r.toml", tables)])
    assert_one_line_error(code, err, "no_such_model")


@pytest.mark.parametrize("table,key,value,needles", [
    ("lora", "rank", 0, ["lora.rank = 0", "positive integer"]),
    ("lora", "roles", [], ["lora.roles = []", "non-empty"]),
    ("lora", "roles", ["coder", "planner", "coder"], ["lora.roles", "repeated: coder"]),
    ("lora", "roles", ["coder", "../../escaped"], ["lora.roles", "plain identifiers", "'../../escaped'"]),
    ("lora", "roles", ["/tmp/abs"], ["lora.roles", "plain identifiers", "'/tmp/abs'"]),
    ("lora", "roles", ["a.b"], ["lora.roles", "plain identifiers"]),
    ("data", "max_len", -5, ["data.max_len = -5"]),
    ("train", "steps", -3, ["train.steps = -3", "positive integer"]),
    ("train", "steps", 0, ["train.steps = 0"]),
    ("train", "lr", -1.0, ["train.lr = -1.0"]),
    ("lora", "targets", ["q_proj", "qkv"], ["lora.targets"]),
])
def test_bad_recipe_value(capsys, train_setup, table, key, value, needles):
    tmp_path, tables = train_setup
    tables[table][key] = value
    recipe = write_recipe(tmp_path / "r.toml", tables)
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, ["train", recipe])
    assert_one_line_error(code, err, recipe, *needles, absent=["no_such_model"])
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_bad_override_value_names_the_key(capsys, train_setup):
    tmp_path, tables = train_setup
    recipe = write_recipe(tmp_path / "r.toml", tables)
    code, err = run_mcl(capsys, ["train", recipe, "train.steps=-3"])
    assert_one_line_error(code, err, recipe, "with overrides", "train.steps = -3", absent=["no_such_model"])
    assert not (tmp_path / "out").exists()


def test_jsonl_with_a_latin1_byte_names_file_and_line(capsys, train_setup):
    tmp_path, tables = train_setup
    data = Path(tables["data"]["path"])
    lines = data.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"task", b"t\xe2che")              # latin-1 e-circumflex on line 3
    data.write_bytes(b"".join(lines))
    recipe = write_recipe(tmp_path / "r.toml", tables)
    before = snapshot(tmp_path)
    code, err = run_mcl(capsys, ["train", recipe])
    assert_one_line_error(code, err, f"{data}:3:", "not UTF-8", "0xe2", absent=["no_such_model"])
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("row,needles", [
    ('{"role": "tester", "messages": []}', [":2:", "'role'", "tester"]),
    ('{"role": "coder", "messages": [{"role": "user", "content": 5}]}', [":2:", "messages[0].content"]),
    ('{"role": "coder", "messages": [', [":2:", "malformed JSON"]),
])
def test_bad_jsonl_row_is_caught_before_the_model_loads(capsys, train_setup, row, needles):
    tmp_path, tables = train_setup
    data = Path(tables["data"]["path"])
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], row] + lines[1:]) + "\n")
    recipe = write_recipe(tmp_path / "r.toml", tables)
    code, err = run_mcl(capsys, ["train", recipe])
    assert_one_line_error(code, err, data, *needles, absent=["no_such_model"])
    assert not (tmp_path / "out").exists()
