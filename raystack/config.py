"""Typed configs from YAML files and ``--set key=value`` overrides.

Every component owns a small dataclass config next to it (``DataConfig`` in ``raystack.data``, ``TrainJobConfig``
in ``raystack.train``, ...). This module turns nested dicts into those dataclasses and fails with a ``ConfigError``
that names the dotted key and the fix: an unknown key, a value of the wrong type, a malformed override.
Values in overrides are parsed as YAML scalars/lists (``optimizer.lr=3e-4``, ``scaling.num_workers=[1,2]``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key and how to fix it."""


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: ``3e-4`` is a float (YAML 1.2), not the string PyYAML's 1.1 rules make it."""


class _Dumper(yaml.SafeDumper):
    """Writes YAML that ``_Loader`` reads back as written: a string it would take for a float (``3e4``) is quoted."""


_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _side in (_Loader, _Dumper):
    _side.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that ``load_yaml`` reads back equal (PyYAML's own dumper leaves ``123e456`` unquoted)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp) -> Any:
    """Return ``value`` coerced to ``tp`` where that is lossless (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields."""
    where = prefix or "config"
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            _refuse_renamed(cls, key, value, prefix)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; valid keys here: {sorted(fields)}")
        factory = fields[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and factory is not dataclasses.MISSING:
            value = deep_merge(dataclasses.asdict(factory()), value)  # a section its owner gives other defaults
        kwargs[key] = _check_value(dotted, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _refuse_renamed(cls: type, key: str, value: Any, prefix: str) -> None:
    """A key a spec renamed (its ``RENAMED`` class attribute: old dotted key -> new) is refused with its new
    spelling, so an old config file or ``--set`` fails with the fix rather than a bare "unknown key"."""
    renamed = getattr(cls, "RENAMED", {})
    olds = [key] if key in renamed else [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else []
    at = f"{prefix}." if prefix else ""
    for old in olds:
        if old in renamed:
            raise ConfigError(f"config key {at + old!r} is now {at + renamed[old]!r}; rename it in the config file "
                              "or --set")
    moved = sorted({new.split(".")[0] for old, new in renamed.items() if old.startswith(f"{key}.")})
    if moved and olds:
        raise ConfigError(f"unknown config key {at + olds[0]!r}: the {at + key!r} section is gone, its keys are now "
                          f"under {', '.join(moved)}")


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right after a field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): no docs, still the keys and defaults
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """``(dotted key, default, doc)`` for every setting of dataclass ``cls``, nested sections flattened: what
    ``--set`` accepts, for ``--help``. ``defaults``: an instance whose values are the defaults (a section whose
    owner gives it other defaults than its class's, like batch's ``sampling``)."""
    hints, docs, rows = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".", None if value is dataclasses.MISSING else value)
            continue
        rows.append((key, "(required)" if value is dataclasses.MISSING else repr(value), docs.get(f.name, "")))
    return rows


def help_text(cls: type, title: str) -> str:
    """``--help`` epilog listing every key of ``cls`` with its default and doc."""
    rows = describe(cls)
    width = max(len(key) for key, _, _ in rows)
    lines = [title]
    for key, default, doc in rows:
        lines.append(f"  {key:<{width}}  {default}" + (f"  -- {doc}" if doc else ""))
    return "\n".join(lines)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """``["optimizer.lr=1e-3", "name=x"]`` -> ``{"optimizer": {"lr": 0.001}, "name": "x"}``."""
    result: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (for example optimizer.lr=3e-4)")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
        set_dotted(result, key, value, what=f"override {item!r}")
    return result


def set_dotted(tree: dict, key: str, value: Any, what: str = "") -> None:
    """``set_dotted(t, "optimizer.lr", 0.1)`` sets ``t["optimizer"]["lr"]``, creating the mappings on the way."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key!s} conflicts with an earlier value of {part!r}")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def merge_sources(data: dict, overrides: typing.Iterable[str] = (), flags: dict | None = None) -> dict:
    """The one precedence rule of every job: the spec's defaults < the file's values < named flags (``--model``,
    ``--input``...) < ``--set`` overrides. A flag and a ``--set`` that give one key two values are refused rather
    than one silently winning."""
    sets = parse_overrides(overrides)
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    for key, value in flags.items():
        if key in sets and sets[key] != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} and --set {key}={sets[key]!r} disagree; "
                              "give the value once")
    return deep_merge(deep_merge(data, flags), sets)


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                flags: dict | None = None) -> T:
    """The config ``cls`` of a job: defaults, then the YAML file at ``path``, then named ``flags``, then
    ``key=value`` overrides (``merge_sources``), validated."""
    return from_dict(cls, merge_sources(read_yaml(path) if path else {}, overrides, flags))
