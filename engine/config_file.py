"""One configuration loader for every command: a dataclass, filled from a TOML file and then `key=value` overrides.

    from engine.config_file import load
    recipe = load(Recipe, "recipes/mini_smollm2.toml", ["train.steps=50"])              # nested: one table per field
    cfg = load(DistillConfig, "recipes/mini_e2e.toml", ["n_problems=5"], table="distill")  # flat: one [table]

The dataclass is the schema: its fields are the valid keys, its annotations the types, its defaults the values a
file leaves out. A field whose default is itself a dataclass is a TOML table (`[train]`), reached in an override
as `train.steps=50`. With `table=` the keys live in that one table of the file (the recipe files hold several
stages' tables) and an override may name it or not (`distill.k=2` or `k=2`).

Overrides are TOML literals (`steps=5`, `lr=1e-3`, `fsdp=true`, `roles=["planner", "coder"]`, `name="x"`);
a bare word that is not a TOML literal is a string (`name=my-run`). Values are typed as a program would expect:
an int where a float is declared becomes a float; a bool is never an int; a list must be a list. Errors are
ValueError (FileNotFoundError for a missing file) and name the file (or "override") and the key:

    r.toml: unknown key 'train.learning_rate'; valid keys: model.name, ..., train.lr, ...
    override: train.steps = 'lots': expected int (like the default 100)

Settings built in code are dataclass instances passed as they are: no TOML strings are assembled anywhere.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

_SIMPLE = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}


def load(cls, path: str | Path | None = None, overrides=(), table: str | None = None, what: str = "key"):
    """cls() updated from the TOML at `path` (its [table] when given, else the whole file), then from the
    `key=value` overrides, in order. `what` names the keys in errors (e.g. "recipe key")."""
    obj = cls()
    if path is not None:
        doc = read_toml(path)
        if table is not None:
            doc = doc.get(table, {})
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: [{table}] is not a table")
        update(obj, doc, str(path), table=table, what=what)
    for ov in overrides:
        set_override(obj, ov, table=table, what=what)
    return obj


def read_toml(path: str | Path) -> dict:
    """The parsed TOML file; a missing file or invalid TOML is one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None


def set_override(obj, override: str, table: str | None = None, what: str = "key") -> None:
    """Apply one `key=value` override to `obj` (`table.key=value` is accepted too when `table` is given)."""
    key, eq, raw = override.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ValueError(f"override {override!r}: expected "
                         + ("table.key=value (e.g. train.steps=50)" if table is None else "key=value (e.g. k=2)"))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw                                               # a bare word: a string
    if table is not None:
        key = key.removeprefix(f"{table}.")
    set_key(obj, key, value, "override", table=table, what=what)


def update(obj, mapping: dict, source: str, table: str | None = None, what: str = "key", _at: str = "") -> None:
    """Set every key of `mapping` on `obj`; a nested dict fills the nested dataclass of that name."""
    for k, v in mapping.items():
        dotted = _at + k
        sub = _resolve(obj, dotted)
        if dataclasses.is_dataclass(sub) or (isinstance(v, dict) and sub is None):
            if not isinstance(v, dict):
                raise ValueError(f"{source}: {dotted} is a table ([{dotted}]), not {v!r}")
            update(obj, v, source, table, what, _at=dotted + ".")      # unknown table: its first key is named
        else:
            set_key(obj, dotted, v, source, table=table, what=what)


def set_key(obj, dotted: str, value, source: str, table: str | None = None, what: str = "key") -> None:
    """obj.<dotted> = value, after checking the key exists and the value has the declared type."""
    *path, name = dotted.split(".")
    target = _resolve(obj, ".".join(path)) if path else obj
    if not dataclasses.is_dataclass(target) or name not in _fields(target) \
            or dataclasses.is_dataclass(getattr(target, name)):
        where = f" in [{table}]" if table else ""
        raise ValueError(f"{source}: unknown {what} {dotted!r}{where}; valid keys: {', '.join(keys(obj))}")
    kind = typing.get_type_hints(type(target))[name]
    old = getattr(target, name)
    ok, value = _check(kind, old, value)
    if not ok:
        raise ValueError(f"{source}: {table + '.' if table else ''}{dotted} = {value!r}: expected "
                         f"{_type_name(kind, old)} (like the default {old!r})")
    setattr(target, name, value)


def keys(obj, prefix: str = "") -> list[str]:
    """Every settable key of `obj`, dotted (train.steps), in declaration order."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out += keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


def _resolve(obj, dotted: str):
    """The value at obj.<dotted>, or None when a name on the way is not a field."""
    for name in dotted.split(".") if dotted else []:
        if name not in _fields(obj):
            return None
        obj = getattr(obj, name)
    return obj


def _fields(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()


def _check(kind, old, value):
    """(ok, the value to store) for `value` against the declared type `kind` (the default's type when the
    annotation is not one of bool/int/float/str/list/dict)."""
    base = typing.get_origin(kind) or kind
    if base not in _SIMPLE:
        base = type(old)
    if base is bool:
        return isinstance(value, bool), value
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, base), value


def _type_name(kind, old) -> str:
    base = typing.get_origin(kind) or kind
    return _SIMPLE.get(base, type(old).__name__)
