"""What the config models say about themselves, for people and for other tools: a JSON schema
per role (the Helm chart's ``values.schema.json`` embeds it) and the Markdown reference
(docs/configuration.md). Both come from the same models ``load_config`` fills, so neither can
drift from what a node accepts; ``scripts/gen_config_docs.py`` writes them and a test checks
that the committed copies are current.

The schema is self-contained (no ``$ref``: a chart embeds it under one of its own keys, where a
reference to ``#/$defs`` would point into the chart's schema), has no generated titles, and
gives every key its default, bounds, description and, for a secret, ``writeOnly``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from dna_core.ops.config import ConfigModel, SecretStr, env_var

__all__ = ["Role", "config_reference", "config_schema"]

SCHEMA_DIR = "deploy/config-schema"  # where scripts/gen_config_docs.py writes each role's schema
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"  # what Helm 3 validates with


@dataclass(frozen=True)
class Role:
    """A kind of node: its name, the command that runs it, its config model and env prefix."""

    name: str
    command: str
    config: type[ConfigModel]
    env_prefix: str


class _RevealedDefaults(GenerateJsonSchema):
    """A secret's default is shown as it is: defaults are not secrets, and a masked one
    (``***``) would read as the value to use."""

    def encode_default(self, dft: Any) -> Any:
        return dft.reveal() if isinstance(dft, SecretStr) else super().encode_default(dft)


def config_schema(role: Role) -> dict[str, Any]:
    """The JSON schema of ``role``'s configuration (the TOML file's structure)."""
    generated = role.config.model_json_schema(schema_generator=_RevealedDefaults)
    definitions = generated.pop("$defs", {})
    body = _inline(generated, definitions)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"{role.command} configuration",
        **{key: value for key, value in body.items() if key != "title"},
    }


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` replaced by its definition, titles dropped, and no default
    on a section (its keys carry their own)."""
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].removeprefix("#/$defs/")]
        extra = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **extra}, definitions)
    out = {key: _inline(value, definitions) for key, value in node.items() if key != "title"}
    if isinstance(node.get("description"), str):
        out["description"] = _one_line(node["description"])  # docstrings wrap at 100 columns
    if "properties" in node:  # "title" is a key name here, never a schema's title
        out["properties"] = {
            name: _inline(value, definitions) for name, value in node["properties"].items()
        }
    if out.get("type") == "object":
        out.pop("default", None)
    return out


# --- the Markdown reference ----------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    name: str  # within its section
    schema: dict[str, Any]
    required: bool


@dataclass(frozen=True)
class _Section:
    path: str  # "storage", "" for the top level
    description: str
    keys: tuple[_Key, ...]


def config_reference(roles: Sequence[Role], *, generator: str) -> str:
    """docs/configuration.md: how settings are given, then every section and key."""
    lines = [*_preamble(roles, generator), ""]
    for path, description, keys, holders in _sections_by_roles(roles):
        lines += _section_table(path, description, keys, holders)
    return "\n".join(lines).rstrip("\n") + "\n"


def _sections_by_roles(
    roles: Sequence[Role],
) -> list[tuple[str, str, tuple[_Key, ...], list[Role]]]:
    """Each section once, with the roles that have it (the same model in each)."""
    found: dict[tuple[str, str], tuple[_Section, list[Role]]] = {}
    for role in roles:
        for section in _sections(config_schema(role), ""):
            fingerprint = json.dumps([(k.name, k.schema) for k in section.keys], sort_keys=True)
            entry = found.setdefault((section.path, fingerprint), (section, []))
            entry[1].append(role)
    return [(s.path, s.description, s.keys, holders) for s, holders in found.values()]


def _sections(schema: dict[str, Any], path: str) -> Iterator[_Section]:
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    leaves = tuple(
        _Key(name, value, name in required)
        for name, value in properties.items()
        if value.get("type") != "object"
    )
    if leaves:
        yield _Section(path, schema.get("description", "") if path else "", leaves)
    for name, value in properties.items():
        if value.get("type") == "object":
            yield from _sections(value, f"{path}.{name}" if path else name)


def _section_table(
    path: str, description: str, keys: tuple[_Key, ...], holders: list[Role]
) -> list[str]:
    title = f"`[{path}]`" if path else "Top level (before any `[section]`)"
    who = ", ".join(f"`{role.command}`" for role in holders)
    lines = [f"## {title}", "", f"In: {who}.", ""]
    if description:
        lines += [_one_line(description), ""]
    lines += [
        "| key | type | default | environment variable | description |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        dotted = f"{path}.{key.name}" if path else key.name
        names = "<br>".join(f"`{env_var(role.env_prefix, dotted)}`" for role in holders)
        lines.append(
            f"| `{key.name}` | {_type(key.schema)} | {_default(key)} | {names} "
            f"| {_description(dotted, key.schema)} |"
        )
    return [*lines, ""]


def _type(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type(schema['items'])}s"
    if kind == "string" and schema.get("format") == "path":
        return "path"
    return f"{kind}{_bounds(schema)}"  # integer, number, boolean, string


def _bounds(schema: dict[str, Any]) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f", {low} to {high}"
    parts = []
    if low is not None:
        parts.append(f"≥ {low}")
    if "exclusiveMinimum" in schema:
        parts.append(f"> {schema['exclusiveMinimum']}")
    if high is not None:
        parts.append(f"≤ {high}")
    return (", " + ", ".join(parts)) if parts else ""


def _default(key: _Key) -> str:
    if key.required:
        return "required"
    if "default" not in key.schema:
        return "unset"  # the model fills it in from other keys: its description says how
    return f"`{json.dumps(key.schema['default'], ensure_ascii=False)}`"


def _description(key: str, schema: dict[str, Any]) -> str:
    text = schema.get("description")
    if not text:  # every key is documented, or generating the reference fails
        raise ValueError(f"{key}: no description (give the field a docstring)")
    secret = " **Secret**: shown masked in `/status`, logs and `check-config`."
    return _one_line(text).replace("|", "\\|") + (secret if schema.get("writeOnly") else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _preamble(roles: Sequence[Role], generator: str) -> list[str]:
    first = roles[0]
    example = env_var(first.env_prefix, "node.host")
    role_rows = [
        f"| `{role.command}` | `{role.env_prefix}` | `{SCHEMA_DIR}/{role.name}.schema.json` |"
        for role in roles
    ]
    return [
        "# Configuration reference",
        "",
        f"<!-- Generated by {generator} from the config models; do not edit by hand: run "
        "`make config-docs`. A test fails while this file is not current. -->",
        "",
        "Every node reads its settings from, lowest precedence first: the defaults below, the "
        "TOML file given with `--config`, then environment variables. `print-default-config` "
        "prints every key with its default as a file to start from; `check-config --config "
        "FILE` loads the settings exactly as `run` would and prints them (secrets masked).",
        "",
        "| command | environment prefix | JSON schema |",
        "|---|---|---|",
        *role_rows,
        "",
        f"**Environment variables** are named `PREFIX__SECTION__KEY` in upper case (`{example}`"
        "; a top-level key is `PREFIX__KEY`): the prefix, each section and the key are joined "
        "by a double underscore, because keys contain single ones (this is pydantic-settings' "
        "`env_nested_delimiter` form). Every variable under a node's prefix must name a key: "
        "an unknown one is an error, not ignored. A value is text parsed as the key's type: a "
        "boolean is `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (any case); a list is "
        'comma-separated (`a:1,b:2`) or a JSON array (`["a:1", "b:2"]`), and an empty '
        "value is an empty list. In the TOML file a value must have the key's type already "
        '(`grpc_port = "7401"` is an error); an integer is taken where a number is expected.',
        "",
        "**Errors.** A setting that is unknown, of the wrong type or out of bounds stops the "
        "node before it binds anything: it exits 1 with one line on stderr naming where the "
        "value came from (the file's path or the variable's name) and the key, e.g. "
        f"`{first.command}: error: {example.replace('HOST', 'UDP_PORT')}: node.udp_port: "
        "input should be less than or equal to 65535, got 70000`. A check across keys (such "
        "as `storage.ttl_days <= storage.max_ttl_days`) names the section and every source "
        "that set a key in it.",
        "",
        "**Secrets** are marked in the models (`writeOnly` in the JSON schema): `/status`, the "
        "`started` log line and `check-config` show a URL's password as `***` "
        "(`redis://:***@10.0.0.5:6379/0`) and any other secret as `***`.",
        "",
        "**JSON schema.** Each command's schema (above) describes the TOML file's structure, "
        "with every key's type, bounds, default and description, unknown keys refused; it is "
        "self-contained (no `$ref`), for a Helm chart's `values.schema.json` to embed.",
    ]
