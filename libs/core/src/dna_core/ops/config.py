"""Node configuration: a frozen dataclass filled from defaults, a TOML file, then the environment.

Precedence is defaults < file < environment, so an operator can ship one file and still override
a single value per deployment (``DNA_STORAGE__MAILBOX__TTL_DAYS=7``). Environment variables are
named ``{PREFIX}__{SECTION}__{FIELD}`` (``{PREFIX}__{FIELD}`` at the top level), upper case; the
double underscore separates levels because field names contain single ones.

Nothing is guessed: an unknown key, a value of the wrong type or one that does not parse raises
``ConfigError`` naming the key and where it came from, because a typo that silently falls back to
a default is the worst kind of misconfiguration on a node nobody watches.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Path``, ``SecretStr``,
``list[X]`` and ``tuple[X, ...]`` of those scalars (a TOML array, or comma-separated in the
environment), and nested frozen dataclasses (TOML tables, "sections").

Secrets are marked in the model, so no way of printing a config shows them: a ``SecretStr``
field (a password, a URL with credentials) prints masked everywhere (``str``, ``repr``, the
dataclass's repr, ``dump_config``) and gives its value only to ``reveal()``; a field of any
type with ``metadata={"secret": True}`` (where a file lives that holds a key) is masked by
``dump_config``, which is what ``/status`` and the startup log line print.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any, TypeVar

from dna_core.errors import DnaError

__all__ = ["ConfigError", "SecretStr", "default_toml", "dump_config", "load_config"]

T = TypeVar("T")
_SECRET_MASK = "***"


class SecretStr:
    """A string that must not be printed. ``masked()`` (also ``str`` and ``repr``) hides it:
    for a URL only its password (``redis://:***@db:6379/0`` still says where), else all."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself: for the one call that needs it (connect), never for printing."""
        return self._value

    def masked(self) -> str:
        parts = urllib.parse.urlsplit(self._value)
        if not (parts.scheme and parts.netloc):
            return _SECRET_MASK if self._value else ""
        if parts.password is None:
            return self._value
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{_SECRET_MASK}@{host}"))

    def __str__(self) -> str:
        return self.masked()

    def __repr__(self) -> str:
        return f"SecretStr({self.masked()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_SCALARS: tuple[type, ...] = (str, int, float, bool, Path, SecretStr)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


class ConfigError(DnaError):
    """The configuration is unusable; ``source`` (file path or env var) and ``key`` say where."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """A settable field: its annotation, and for a sequence its container and item type."""

    annotation: Any
    container: type | None = None
    item: type | None = None

    @property
    def name(self) -> str:
        return _type_name(self.annotation)


@dataclasses.dataclass(frozen=True)
class _Section:
    """A nested dataclass: a TOML table, one ``__`` level in environment names."""

    cls: type
    children: dict[str, _Leaf | _Section]


def load_config(
    cls: type[T],
    path: Path | None,
    *,
    env_prefix: str,
    env: Mapping[str, str] = os.environ,
) -> T:
    """Build ``cls`` from its defaults, then ``path`` (if given), then ``env`` overrides."""
    schema = _schema(cls)
    values: dict[str, Any] = {}
    if path is not None:
        values = _from_file(schema, path)
    _merge(values, _from_env(schema, env, env_prefix.upper()))
    built: T = _build(schema, values, None, "", env_prefix.upper())
    return built


def dump_config(obj: object) -> dict[str, Any]:
    """A JSON-ready dict of a config object for ``/status``; secret fields are masked."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"dump_config needs a dataclass instance, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret"):
            out[f.name] = _SECRET_MASK
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = dump_config(value)
        else:
            out[f.name] = _jsonable(value)
    return out


def default_toml(cls: type) -> str:
    """Every setting of ``cls`` with its default, as a TOML file ``load_config`` reads back
    to the same config (defaults are not secrets, so they are shown as they are)."""
    lines = _toml_section(cls(), "")
    return "\n".join(lines) + "\n"


def _toml_section(obj: object, name: str) -> list[str]:
    scalars = [f"[{name}]"] if name else []
    sections: list[str] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            sections += ["", *_toml_section(value, f"{name}.{f.name}" if name else f.name)]
        else:
            scalars.append(f"{f.name} = {_toml_literal(value)}")
    return scalars + sections


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, SecretStr):
        value = value.reveal()
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return value.masked()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --- schema -----------------------------------------------------------------------------------


def _schema(cls: type) -> _Section:
    """Walk ``cls`` once up front so an unsupported annotation fails even if never set."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    children: dict[str, _Leaf | _Section] = {}
    for f in dataclasses.fields(cls):
        children[f.name] = _node(hints[f.name], f"{cls.__name__}.{f.name}")
    return _Section(cls, children)


def _node(annotation: Any, where: str) -> _Leaf | _Section:
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _schema(annotation)
    if annotation in _SCALARS:
        return _Leaf(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1 and args[0] in _SCALARS:
        return _Leaf(annotation, list, args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return _Leaf(annotation, tuple, args[0])
    raise TypeError(f"{where}: unsupported config field type {annotation!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is None and isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


# --- the file ---------------------------------------------------------------------------------


def _from_file(schema: _Section, path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "config file not found") from None
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"invalid TOML: {exc}") from None
    return _convert_table(schema, table, source, "")


def _convert_table(
    schema: _Section, table: Mapping[str, Any], source: str, prefix: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in table.items():
        key = prefix + name
        node = schema.children.get(name)
        if node is None:
            raise ConfigError(source, key, _unknown(schema, prefix))
        if isinstance(node, _Section):
            if not isinstance(raw, dict):
                raise ConfigError(source, key, f"expected a table [{key}], got {_shown(raw)}")
            out[name] = _convert_table(node, raw, source, key + ".")
        else:
            out[name] = _toml_value(node, raw, source, key)
    return out


def _toml_value(leaf: _Leaf, raw: object, source: str, key: str) -> object:
    if leaf.container is None:
        return _toml_scalar(leaf.annotation, raw, source, key)
    if not isinstance(raw, list):
        raise ConfigError(source, key, f"expected an array ({leaf.name}), got {_shown(raw)}")
    assert leaf.item is not None
    items = [_toml_scalar(leaf.item, item, source, key) for item in raw]
    return leaf.container(items)


def _toml_scalar(kind: type, raw: object, source: str, key: str) -> object:
    """TOML is typed, so only widen int to float and str to Path; anything else is a mistake."""
    if kind is bool and isinstance(raw, bool):
        return raw
    if isinstance(raw, bool):
        pass  # a bool is an int in Python, never a number in a config
    elif kind is int and isinstance(raw, int):
        return raw
    elif kind is float and isinstance(raw, int | float):
        return float(raw)
    elif kind is str and isinstance(raw, str):
        return raw
    elif kind is SecretStr and isinstance(raw, str):
        return SecretStr(raw)
    elif kind is Path and isinstance(raw, str):
        return _path(raw, source, key)
    raise ConfigError(source, key, f"expected {kind.__name__}, got {_shown(raw)}")


# --- the environment --------------------------------------------------------------------------


def _from_env(schema: _Section, env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    start = prefix + "__"
    for var in sorted(name for name in env if name.startswith(start)):
        parts = [p.lower() for p in var[len(start) :].split("__")]
        leaf, key = _env_target(schema, parts, var)
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _env_value(leaf, env[var], var, key)
    return out


def _env_target(schema: _Section, parts: list[str], var: str) -> tuple[_Leaf, str]:
    """Find the field a variable names, walking one section per ``__`` level."""
    node: _Leaf | _Section = schema
    for depth, part in enumerate(parts):
        key, above = ".".join(parts[: depth + 1]), ".".join(parts[:depth])
        if not isinstance(node, _Section):
            raise ConfigError(var, key, f"unknown key ({above} is a {node.name}, not a section)")
        if part not in node.children:
            raise ConfigError(var, key, _unknown(node, above + "." if above else ""))
        node = node.children[part]
    key = ".".join(parts)
    if isinstance(node, _Section):
        raise ConfigError(var, key, f"is a section: set {var}__<FIELD> instead")
    return node, key


def _env_value(leaf: _Leaf, text: str, var: str, key: str) -> object:
    if leaf.container is None:
        return _env_scalar(leaf.annotation, text, var, key)
    assert leaf.item is not None
    items = [part.strip() for part in text.split(",")]
    return leaf.container(_env_scalar(leaf.item, item, var, key) for item in items if item)


def _env_scalar(kind: type, text: str, var: str, key: str) -> object:
    parsers: dict[type, Callable[[str], object]] = {
        str: str,
        SecretStr: SecretStr,
        int: lambda s: int(s.strip()),
        float: lambda s: float(s.strip()),
        bool: _bool,
        Path: lambda s: _path(s, var, key),
    }
    try:
        return parsers[kind](text)
    except ValueError:
        raise ConfigError(var, key, f"cannot parse {text!r} as {kind.__name__}") from None


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(text)


def _path(text: str, source: str, key: str) -> Path:
    if not text:
        raise ConfigError(source, key, "empty path")
    return Path(text)


# --- assembly ---------------------------------------------------------------------------------


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    """Overlay ``override`` onto ``base`` in place, section by section."""
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            _merge(base[name], value)
        else:
            base[name] = value


def _build(
    schema: _Section, values: Mapping[str, Any], base: object | None, prefix: str, env_prefix: str
) -> Any:
    """Instantiate one section: given values win, then ``base`` (the enclosing default), then
    the field's own default."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(schema.cls):
        node, key = schema.children[f.name], prefix + f.name
        inherited = getattr(base, f.name) if base is not None else _default(f)
        if isinstance(node, _Section):
            sub, sub_base = values.get(f.name, {}), None if inherited is MISSING else inherited
            kwargs[f.name] = _build(node, sub, sub_base, key + ".", env_prefix)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif inherited is not MISSING:
            kwargs[f.name] = inherited
        else:
            var = f"{env_prefix}__{key.replace('.', '__').upper()}"
            raise ConfigError("config", key, f"required (no default): set it in the file or {var}")
    try:
        return schema.cls(**kwargs)
    except ValueError as exc:  # a __post_init__ check of the dataclass itself
        raise ConfigError("config", prefix.rstrip(".") or "(top)", str(exc)) from None


def _default(f: dataclasses.Field[Any]) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _unknown(section: _Section, prefix: str) -> str:
    known = ", ".join(prefix + name for name in section.children)
    return f"unknown key (known: {known})"


def _shown(raw: object) -> str:
    return f"{type(raw).__name__} {raw!r}"
