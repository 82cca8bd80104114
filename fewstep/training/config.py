"""Configs: recipe dataclasses carry the paper defaults; TOML presets under ``recipes/`` override them.

Resolution order, later wins: the dataclass defaults, the preset ``recipes/<recipe>/<preset>.toml``, a ``--config``
file, then ``--set a.b=value`` overrides. Values of ``--set`` are read as TOML literals (``3``, ``1e-4``, ``true``,
``[1.0, 0.5]``, ``"text"``), falling back to a bare string. Unknown keys and ill-typed values are one-line errors.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FewstepError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def presets_dir() -> Path:
    """The folder of TOML presets: ``fewstep/_presets`` in a wheel, ``<repo>/recipes`` in an editable install."""
    package = Path(__file__).resolve().parents[1]  # fewstep/
    packaged = package / "_presets"
    if packaged.is_dir():
        return packaged
    return package.parent / "recipes"


def find_preset(recipe: str, name: str) -> Path:
    folder = presets_dir() / recipe
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
        raise FewstepError(f"recipe {recipe!r} has no preset {name!r}; presets: {', '.join(known) or 'none'}")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FewstepError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise FewstepError(f"{path} is not valid TOML: {err}") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise FewstepError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a dataclass field's type hint, converting only where it loses nothing."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise FewstepError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except FewstepError:
                continue
        raise FewstepError(f"{where}: {value!r} does not fit {hint}")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            raise FewstepError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else Any
        items = [_coerce(v, args[i] if args and args[-1] is not Ellipsis and len(args) > 1 else item, where)
                 for i, v in enumerate(value)]  # fmt: skip
        return tuple(items) if origin is tuple or hint is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise FewstepError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def merge_into(cfg: Any, overrides: Mapping[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``cfg`` with ``overrides`` (nested dicts for nested dataclasses) applied and checked."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in fields:
            raise FewstepError(f"unknown config key {name!r}; known: {', '.join(sorted(fields))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge_into(current, value, f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name)
    return dataclasses.replace(cfg, **changes)


def resolve_config(
    default: Any, preset: Path | None = None, config_file: Path | None = None, sets: Sequence[str] = ()
) -> Any:
    """Defaults, then the preset, the config file and the ``--set`` overrides, each checked against the dataclass."""
    cfg = default
    for layer in (read_toml(preset) if preset else {}, read_toml(config_file) if config_file else {}, parse_set(sets)):
        cfg = merge_into(cfg, layer)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Any, table: str = "") -> str:
    """A dataclass as TOML (None values are left out, as TOML has no null); ``resolve_config`` reads it back."""
    lines, nested = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            nested.append(to_toml(value, f"{table}{f.name}."))
        elif value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    header = [f"[{table[:-1]}]"] if table and lines else []
    return "\n".join([*header, *lines, *nested]) + ("\n" if lines or nested else "")
