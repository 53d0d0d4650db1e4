"""Node configuration: pydantic models filled from defaults, a TOML file, then the environment.

A node's configuration is a tree of ``ConfigModel`` classes (frozen, strict, unknown keys
forbidden); ``load_config`` fills one with ``pydantic-settings``. Precedence is defaults < file <
environment, so an operator can ship one file and still override a single value per deployment
(``DNA_STORAGE__MAILBOX__TTL_DAYS=7``). Environment variables are named
``{PREFIX}__{SECTION}__{FIELD}`` (``{PREFIX}__{FIELD}`` at the top level), upper case: that is
pydantic-settings' own form (``env_prefix="{PREFIX}__"``, ``env_nested_delimiter="__"``); the
double underscore separates levels because field names contain single ones. A list is a
comma-separated value (``a:1,b:2``) or a JSON array (``["a:1", "b:2"]``).

Nothing is guessed: an unknown key (in the file or under our prefix in the environment), a value
of the wrong type or one that does not parse raises ``ConfigError`` naming the key and where it
came from (the file's path or the variable's name), because a typo that silently falls back to
a default is the worst kind of misconfiguration on a node nobody watches. TOML is typed, so the
file must give the type itself (an int widens to a float, a string to a path, nothing else);
an environment variable is text, parsed as the field's type.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Path`` (use ``ConfigPath``),
``SecretStr``, a ``Literal`` of strings, ``tuple[X, ...]`` / ``list[X]`` of those scalars (use
``Strings`` for ``tuple[str, ...]``), and nested ``ConfigModel`` sections (TOML tables).

Secrets are marked in the model, so no way of printing a config shows them: a ``SecretStr``
field (a password, a URL with credentials) prints masked everywhere (``str``, ``repr``,
``dump_config``) and gives its value only to ``reveal()``; a field of any other type annotated
with ``Secret()`` (where a file lives that holds a key) is masked by ``dump_config``, which is
what ``/status`` and the startup log line print. Both are ``writeOnly`` in the JSON schema.
"""

from __future__ import annotations

import functools
import json
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard, TypeVar, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dna_core.errors import DnaError

__all__ = [
    "ConfigError",
    "ConfigModel",
    "ConfigPath",
    "LogLevel",
    "LogLevelSetting",
    "OpsSection",
    "Port",
    "Secret",
    "SecretStr",
    "Strings",
    "default_toml",
    "dump_config",
    "env_var",
    "load_config",
    "no_default_shown",
]

M = TypeVar("M", bound="ConfigModel")
_SECRET_MASK = "***"
_LEVEL = "__"  # between the prefix, sections and the field in an environment variable's name


class ConfigError(DnaError):
    """The configuration is unusable; ``source`` (file path or env var) and ``key`` say where."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


# --- the types a config is made of -----------------------------------------------------------


class SecretStr:
    """A string that must not be printed. ``masked()`` (also ``str``, ``repr`` and a JSON dump)
    hides it: for a URL only its password (``redis://:***@db:6379/0`` still says where), else
    all."""

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

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                SecretStr.masked, when_used="json"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "writeOnly": True}

    @classmethod
    def _validate(cls, value: object) -> SecretStr:
        if isinstance(value, SecretStr):
            return value
        if isinstance(value, str):
            return cls(value)
        raise PydanticCustomError("string_type", "Input should be a valid string")


def _masked_unless_empty(value: object) -> object:
    # An empty value hides nothing: shown as it is (as an empty SecretStr is), so that
    # check-config and /status tell "none configured" from "some, masked".
    if isinstance(value, str | tuple | list) and not value:
        return [] if isinstance(value, tuple | list) else ""
    return _SECRET_MASK


class Secret:
    """Marks a field of any type secret: ``Annotated[ConfigPath, Secret()]``. ``dump_config``
    prints it as ``***`` (an empty one as it is) and the JSON schema says ``writeOnly``."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        masked = core_schema.plain_serializer_function_ser_schema(
            _masked_unless_empty, when_used="json"
        )
        return cast(core_schema.CoreSchema, {**handler(source), "serialization": masked})

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "writeOnly": True}


def _non_empty_path(value: object) -> object:
    if value == "":
        raise ValueError("empty path")
    return value


# A path: a TOML string (strict mode alone would take only a Path object), never empty.
ConfigPath = Annotated[Path, Strict(False), BeforeValidator(_non_empty_path)]
# A list of strings: a TOML array (strict mode alone would take only a tuple).
Strings = Annotated[tuple[str, ...], Strict(False)]
Port = Annotated[int, Field(ge=0, le=65535)]


class ConfigModel(BaseModel):
    """A section of a node's configuration (a TOML table), or the whole of it. Frozen; strict
    (TOML values must have the field's type); an unknown key is an error; each attribute's
    docstring is its description in the schema and in docs/configuration.md."""

    model_config = ConfigDict(
        frozen=True, strict=True, extra="forbid", use_attribute_docstrings=True
    )


def no_default_shown(schema: dict[str, Any]) -> None:
    """``Field(json_schema_extra=no_default_shown)``: a default that stands for "unset" (the
    node derives the value from other keys) is left out of the schema and shown as unset."""
    schema.pop("default", None)


def env_var(env_prefix: str, key: str) -> str:
    """The variable that sets ``key`` (``storage.ttl_days``): ``DNA_STORAGE__STORAGE__TTL_DAYS``."""
    return _LEVEL.join([env_prefix.upper(), *key.upper().split(".")])


# --- sections every node has -----------------------------------------------------------------


class OpsSection(ConfigModel):
    """The operator HTTP endpoints: /healthz, /readyz, /metrics, /status."""

    http_host: str = "127.0.0.1"
    """Where they listen: keep them private."""
    http_port: Port = 7480
    """Their TCP port."""


# Python's level names (`logging.getLevelNamesMapping`), which `configure_logging` takes.
LogLevel = Literal["critical", "fatal", "error", "warn", "warning", "info", "debug", "notset"]


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


# A node's `log_level`, in any case ("INFO" is "info").
LogLevelSetting = Annotated[LogLevel, BeforeValidator(_lower)]


# --- loading ---------------------------------------------------------------------------------


def load_config(
    cls: type[M],
    path: Path | None,
    *,
    env_prefix: str,
    env: Mapping[str, str] = os.environ,
) -> M:
    """Build ``cls`` from its defaults, then ``path`` (if given), then ``env`` overrides."""
    _check_model(cls)
    sources = _Sources(cls, path, env, env_prefix.upper())
    try:
        loaded = sources.settings_class()()
    except ValidationError as exc:
        raise sources.error(exc) from None
    return cls.model_validate(dict(loaded))


class _Sources:
    """The file and environment for one load, and which of them set each key (an error names
    the source of the value it is about)."""

    def __init__(self, cls: type[ConfigModel], path: Path | None, env: Mapping[str, str],
                 prefix: str) -> None:  # fmt: skip
        self.cls, self.prefix = cls, prefix
        self.origins: dict[tuple[str, ...], str] = {}
        self.file: dict[str, Any] = {}
        if path is not None:
            self.file = _read_toml(path)
            self.origins |= {key: str(path) for key in _leaf_keys(self.file)}
        self.env = env

    def settings_class(self) -> type[BaseSettings]:
        """``cls`` as pydantic-settings' ``BaseSettings``, reading this load's sources."""

        def customise_sources(
            owner: type[BaseSettings],
            /,
            settings_cls: type[BaseSettings],
            **_defaults: PydanticBaseSettingsSource,  # init, env, dotenv, secrets: not ours
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            environment = _Environment(settings_cls, self.env, self.prefix)
            self.origins |= environment.origins
            return environment, InitSettingsSource(settings_cls, self.file)

        namespace = {
            "model_config": SettingsConfigDict(
                case_sensitive=True,  # TOML keys are lower case; env names are lowered for us
                nested_model_default_partial_update=True,  # a [section] keeps its other defaults
                validate_default=False,
            ),
            "settings_customise_sources": classmethod(customise_sources),
        }
        bases = (self.cls, BaseSettings)
        return types.new_class(self.cls.__name__, bases, {}, lambda ns: ns.update(namespace))

    def error(self, exc: ValidationError) -> ConfigError:
        """One ``ConfigError`` for the first problem pydantic found, naming its source."""
        errors = exc.errors(include_url=False)
        first = errors[0]
        key = tuple(str(part) for part in first["loc"] if isinstance(part, str))
        source = self._source_of(key)
        problem = _problem(first, self.cls, key, from_env=source.startswith(self.prefix + _LEVEL))
        if first["type"] == "missing":
            problem += f": set it in the file or {env_var(self.prefix, '.'.join(key))}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return ConfigError(source, ".".join(key) or "(top)", problem + more)

    def _source_of(self, key: tuple[str, ...]) -> str:
        if key in self.origins:
            return self.origins[key]
        under = sorted({source for k, source in self.origins.items() if k[: len(key)] == key})
        return ", ".join(under) or "config"  # a check across fields, or a required one left out


class _Environment(EnvSettingsSource):
    """The environment as this project reads it: only upper-case names under the role's prefix,
    each of which must name a setting; text made ready for pydantic (lists as JSON arrays)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str],
                 prefix: str) -> None:  # fmt: skip
        self._env, self._start = env, prefix + _LEVEL  # before super(): it reads them
        self.origins: dict[tuple[str, ...], str] = {}
        super().__init__(
            settings_cls, case_sensitive=True, env_prefix=self._start.lower(),
            env_nested_delimiter=_LEVEL,
        )  # fmt: skip

    def _load_env_vars(self) -> Mapping[str, str | None]:
        found: dict[str, str | None] = {}
        for var in sorted(name for name in self._env if name.startswith(self._start)):
            parts = tuple(var[len(self._start) :].lower().split(_LEVEL))
            annotation = _env_target(cast(type[ConfigModel], self.settings_cls), parts, var)
            found[var.lower()] = _env_text(annotation, self._env[var], var, ".".join(parts))
            self.origins[parts] = var
        return found


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            source,
            "(file)",
            "config file not found (`print-default-config > FILE` writes one to start from)",
        ) from None
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"invalid TOML: {exc}") from None


def _leaf_keys(table: Mapping[str, Any], above: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for name, value in table.items():
        key = (*above, name)
        keys += _leaf_keys(value, key) if isinstance(value, dict) and value else [key]
    return keys


def _env_target(cls: type[ConfigModel], parts: tuple[str, ...], var: str) -> Any:
    """The annotation of the field a variable names, walking one section per ``__`` level."""
    section: type[ConfigModel] | None = cls
    annotation: Any = None
    for depth, part in enumerate(parts):
        key, above = ".".join(parts[: depth + 1]), ".".join(parts[:depth])
        if section is None:
            shown = _type_name(annotation)
            raise ConfigError(var, key, f"unknown key ({above} is a {shown}, not a section)")
        if part not in section.model_fields:
            raise ConfigError(var, key, _unknown(section, above + "." if above else ""))
        annotation = section.model_fields[part].annotation
        section = annotation if _is_section(annotation) else None
    if section is not None:
        raise ConfigError(var, ".".join(parts), f"is a section: set {var}__<FIELD> instead")
    return annotation


def _env_text(annotation: Any, text: str, var: str, key: str) -> str:
    """The variable's text as pydantic-settings should see it: a list as a JSON array, a number
    or flag without the spaces around it."""
    if typing.get_origin(annotation) in (list, tuple):
        try:
            if isinstance(json.loads(text), list):
                return text
        except ValueError:
            pass  # not JSON: a comma-separated list
        return json.dumps([item.strip() for item in text.split(",") if item.strip()])
    if annotation is Path and not text:
        raise ConfigError(var, key, "empty path")
    if annotation in (int, float, bool):
        return text.strip()
    return text


# --- errors ----------------------------------------------------------------------------------

# pydantic's error type -> the type a value should have had, in the words of a TOML file.
_EXPECTED = {
    "int_type": "int", "int_parsing": "int", "int_from_float": "int",
    "float_type": "float", "float_parsing": "float",
    "bool_type": "bool", "bool_parsing": "bool",
    "string_type": "str", "path_type": "Path",
    "list_type": "an array", "tuple_type": "an array",
    "model_type": "a table", "model_attributes_type": "a table", "dict_type": "a table",
}  # fmt: skip


def _problem(error: Any, cls: type[ConfigModel], key: tuple[str, ...], *, from_env: bool) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        section = _section_at(cls, key[:-1])
        return _unknown(section, ".".join(key[:-1]) + "." if len(key) > 1 else "")
    if kind == "missing":
        return "required (no default)"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    if kind in _EXPECTED:
        if from_env:
            return f"cannot parse {value!r} as {_EXPECTED[kind]}"
        expected = _EXPECTED[kind]
        if expected == "a table":
            expected = f"a table [{'.'.join(key)}]"
        elif expected == "an array":
            expected = f"an array ({_type_name(_field_at(cls, key).annotation)})"
        return f"expected {expected}, got {type(value).__name__} {value!r}"
    message: str = error["msg"]  # a constraint: "Input should be less than or equal to 65535"
    return f"{message[0].lower()}{message[1:]}, got {value!r}"


def _unknown(section: type[ConfigModel], prefix: str) -> str:
    known = ", ".join(prefix + name for name in section.model_fields)
    return f"unknown key (known: {known})"


def _section_at(cls: type[ConfigModel], key: tuple[str, ...]) -> type[ConfigModel]:
    section = cls
    for part in key:
        section = section.model_fields[part].annotation  # type: ignore[assignment]
    return section


def _field_at(cls: type[ConfigModel], key: tuple[str, ...]) -> Any:
    return _section_at(cls, key[:-1]).model_fields[key[-1]]


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is None and isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


# --- which models are supported ----------------------------------------------------------------

_SCALARS: tuple[type, ...] = (str, int, float, bool, Path, SecretStr)


def _is_section(annotation: Any) -> TypeGuard[type[ConfigModel]]:
    return isinstance(annotation, type) and issubclass(annotation, ConfigModel)


@functools.cache
def _check_model(cls: type) -> None:
    """Fail on an annotation the file and environment cannot express, even if never set (a
    programming error, so a ``TypeError``)."""
    if not _is_section(cls):
        raise TypeError(f"load_config needs a ConfigModel subclass, got {cls!r}")
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if _is_section(annotation):
            _check_model(annotation)
        elif not _is_scalar(annotation) and not _is_sequence(annotation):
            raise TypeError(f"{cls.__name__}.{name}: unsupported config field type {annotation!r}")


def _is_scalar(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(annotation))
    return annotation in _SCALARS


def _is_sequence(annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1:
        return _is_scalar(args[0])
    return origin is tuple and len(args) == 2 and args[1] is Ellipsis and _is_scalar(args[0])


# --- printing ----------------------------------------------------------------------------------


def dump_config(obj: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of a config object for ``/status``; secret fields are masked."""
    if not isinstance(obj, BaseModel):
        raise TypeError(f"dump_config needs a config model, got {type(obj).__name__}")
    return _unset_as_null(obj, obj.model_dump(mode="json"))


def _unset_as_null(obj: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """A default that stands for "unset" (``no_default_shown``) left at it is shown as null,
    as ``default_toml`` shows it unset: a record file's Path("") was shown as ".", the
    working directory, which no node uses (``/status`` shows the file used, `record_file`)."""
    for name, field in type(obj).model_fields.items():
        value = getattr(obj, name)
        if isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _unset_as_null(value, dumped[name])
        elif field.json_schema_extra is no_default_shown and value == field.default:
            dumped[name] = None
    return dumped


def default_toml(cls: type[ConfigModel]) -> str:
    """Every setting of ``cls`` with its default, as a TOML file ``load_config`` reads back
    to the same config (defaults are not secrets, so they are shown as they are)."""
    lines = _toml_section(cls(), "")
    return "\n".join(lines) + "\n"


def _toml_section(obj: BaseModel, name: str) -> list[str]:
    scalars = [f"[{name}]"] if name else []
    sections: list[str] = []
    for field_name, field in type(obj).model_fields.items():
        value = getattr(obj, field_name)
        if isinstance(value, BaseModel):
            key = f"{name}.{field_name}" if name else field_name
            sections += ["", *_toml_section(value, key)]
        elif field.json_schema_extra is no_default_shown:
            # Its default stands for "unset" and has no honest value to print: a record
            # file's Path("") printed as `path = "."`, which reads as "the working directory".
            scalars.append(f"# {field_name}: unset (the node derives it: docs/configuration.md)")
        else:
            scalars.append(f"{field_name} = {_toml_literal(value)}")
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
