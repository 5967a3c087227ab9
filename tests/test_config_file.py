"""engine/config_file.py: the one loader (dataclasses + TOML + key=value overrides) behind mcl train and the recipes.

    python -m pytest tests/test_config_file.py -q
"""
from dataclasses import dataclass, field

import pytest

from engine.config_file import keys, load


@dataclass
class Inner:
    steps: int = 100
    lr: float = 2e-4
    fsdp: bool = False
    roles: list = field(default_factory=lambda: ["a", "b"])


@dataclass
class Outer:
    name: str = "x"
    train: Inner = field(default_factory=Inner)


@dataclass
class Flat:
    k: int = 1
    rate: float = 0.5
    out: str = "runs/x"
    tags: list[str] = field(default_factory=list)


def test_nested_file_then_overrides(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "from file"\n[train]\nsteps = 3\nlr = 1\n')
    o = load(Outer, p, ["train.steps=7", "train.fsdp=true", 'train.roles=["c"]', "name=bare-word"])
    assert (o.name, o.train.steps, o.train.lr, o.train.fsdp, o.train.roles) == ("bare-word", 7, 1.0, True, ["c"])
    assert isinstance(o.train.lr, float)                       # an int where a float is declared becomes a float
    assert keys(o) == ["name", "train.steps", "train.lr", "train.fsdp", "train.roles"]


def test_flat_table_of_a_multi_table_file(tmp_path):
    p = tmp_path / "e2e.toml"
    p.write_text('[distill]\nk = 2\nout = "a b\\"c"\n[main]\nlimit = 4\n')
    c = load(Flat, p, ["distill.rate=1", 'out="with \\"quotes\\" and spaces"'], table="distill")
    assert (c.k, c.rate, c.out) == (2, 1.0, 'with "quotes" and spaces')
    assert load(Flat, p, [], table="absent") == Flat()        # a missing table: the defaults


@pytest.mark.parametrize("source,override,needle", [
    ("[train]\nstepz = 3\n", None, "r.toml: unknown key 'train.stepz'; valid keys: name, train.steps"),
    ("[optim]\nlr = 0.1\n", None, "r.toml: unknown key 'optim.lr'"),
    ("train = 3\n", None, "r.toml: train is a table"),
    ("[train]\nsteps = 2.5\n", None, "r.toml: train.steps = 2.5: expected int (like the default 100)"),
    ("[train]\nfsdp = 1\n", None, "r.toml: train.fsdp = 1: expected bool"),
    ("", "train.steps=lots", "override: train.steps = 'lots': expected int"),
    ("", "train.steps=true", "override: train.steps = True: expected int"),
    ("", "train.roles=a", "override: train.roles = 'a': expected list"),
    ("", "train.steps", "expected table.key=value"),
    ("", "trian.steps=1", "override: unknown key 'trian.steps'"),
    ("[train\n", None, "r.toml: invalid TOML"),
])
def test_errors_name_the_file_and_the_key(tmp_path, source, override, needle):
    p = tmp_path / "r.toml"
    p.write_text(source)
    with pytest.raises(ValueError) as e:
        load(Outer, p, [override] if override else [])
    assert needle in str(e.value), str(e.value)


def test_flat_errors_name_the_table(tmp_path):
    with pytest.raises(ValueError, match=r"override: unknown key 'kk' in \[distill\]; valid keys: k, rate"):
        load(Flat, None, ["kk=2"], table="distill")
    with pytest.raises(ValueError, match=r"override: distill.tags = 3: expected list"):
        load(Flat, None, ["tags=3"], table="distill")
    with pytest.raises(FileNotFoundError, match="nope.toml: config file not found"):
        load(Flat, tmp_path / "nope.toml", table="distill")
