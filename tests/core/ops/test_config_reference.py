"""The configuration reference and JSON schemas: committed copies are current, every key is in
them, and the schema accepts and refuses what the loader does."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dna_core.ops.config import (
    ConfigError,
    ConfigModel,
    LogLevel,
    default_toml,
    env_var,
    load_config,
)
from dna_core.ops.config_reference import Role, config_reference, config_schema
from jsonschema import Draft7Validator
from pydantic import BaseModel
from support import load_script

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"


def _generator() -> ModuleType:
    return load_script("gen_config_docs")


GEN = _generator()
ROLES: tuple[Role, ...] = GEN.ROLES
STORAGE = next(role for role in ROLES if role.name == "storage")


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- the committed files ---------------------------------------------------------------------


@pytest.mark.process  # runs the generator script
def test_the_committed_reference_and_schemas_are_current() -> None:
    out = check(ROOT)
    assert (out.returncode, out.stderr) == (0, ""), out.stderr


@pytest.mark.process  # runs the generator script
def test_check_names_each_file_that_is_stale_or_missing(tmp_path: Path) -> None:
    assert check(tmp_path).returncode == 1  # nothing written yet: every file is missing
    written = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert set(written.stdout.split()) == {
        "docs/configuration.md",
        "deploy/config-schema/bootstrap.schema.json",
        "deploy/config-schema/storage.schema.json",
        "deploy/config-schema/stun.schema.json",
    }
    assert check(tmp_path).returncode == 0
    reference = tmp_path / "docs" / "configuration.md"
    reference.write_text(reference.read_text().replace("ttl_days", "ttl_dayz"))
    out = check(tmp_path)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "docs/configuration.md: not current: run `make config-docs` and commit"
    ]


# --- the reference -----------------------------------------------------------------------------


def keys(model: type[BaseModel], above: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{above}{name}"
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, ConfigModel)
        out += keys(annotation, key + ".") if is_section else [key]  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_key_of_every_role_is_in_the_reference_with_its_variable(role: Role) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    role_keys = keys(role.config)
    assert len(role_keys) >= 20  # the walk went into the sections (dna-stun has 21 keys)
    for key in role_keys:
        section, _, name = key.rpartition(".")
        assert f"`{env_var(role.env_prefix, key)}`" in text, key
        heading = f"## `[{section}]`" if section else "## Top level"
        table = text[text.index(heading) :].split("\n## ")[0]
        assert f"| `{name}` |" in table, key


def test_secrets_are_marked_in_the_reference_and_the_schema() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    secret_rows = [line for line in text.splitlines() if "**Secret**" in line]
    assert [row.split("|")[1].strip() for row in secret_rows] == [
        "`key_file`", "`redis_url`", "`users`", "`auth_secret`", "`previous_auth_secret`"
    ]  # fmt: skip
    properties = config_schema(STORAGE)["properties"]
    assert properties["storage"]["properties"]["redis_url"]["writeOnly"] is True
    assert properties["node"]["properties"]["key_file"]["writeOnly"] is True
    assert "writeOnly" not in properties["node"]["properties"]["host"]
    # Defaults are not secrets: shown as they are, not masked.
    assert properties["storage"]["properties"]["redis_url"]["default"].startswith("redis://")


def test_a_key_without_a_description_fails_the_reference() -> None:
    class Section(ConfigModel):
        documented: int = 1
        """Has one."""
        bare: int = 2

    class Root(ConfigModel):
        part: Section = Section()

    with pytest.raises(ValueError, match=r"part\.bare: no description"):
        config_reference([Role("x", "dna-x", Root, "DNA_X")], generator="test")


def test_log_levels_are_pythons() -> None:
    # Python's own levels: a library started in this process may have added names of its
    # own (uvicorn adds TRACE, level 5, when a node's HTTP server starts in-process).
    own = {logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, 0}
    python = {name.lower() for name, level in logging.getLevelNamesMapping().items()
              if level in own}  # fmt: skip
    assert set(typing.get_args(LogLevel)) == python


# --- the schema agrees with the loader ---------------------------------------------------------


def schema_errors(role: Role, values: dict[str, Any]) -> list[str]:
    """The dotted path of each place the schema refuses ``values``."""
    validator = Draft7Validator(config_schema(role))
    return sorted(".".join(map(str, e.absolute_path)) for e in validator.iter_errors(values))


def loader_error(role: Role, text: str, tmp_path: Path) -> ConfigError | None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    try:
        load_config(role.config, path, env_prefix=role.env_prefix, env={})
    except ConfigError as exc:
        return exc
    return None


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_the_schema_is_self_contained_and_draft_7_valid(role: Role) -> None:
    schema = config_schema(role)
    Draft7Validator.check_schema(schema)
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_a_default_that_stands_for_unset_is_printed_as_unset(role: Role) -> None:
    """`print-default-config` printed the record file's unset path as `path = "."`, which an
    operator reads as "the working directory" (it meant records.sqlite3 in the node's data
    directory); the file still reads back as the defaults."""
    printed = default_toml(role.config)
    assert 'path = "."' not in printed
    if role.name != "stun":
        assert "# path: unset (the node derives it: docs/configuration.md)" in printed
    assert role.config.model_validate(tomllib.loads(printed)) == role.config()


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_the_schema_accepts_the_default_config(role: Role) -> None:
    assert schema_errors(role, tomllib.loads(default_toml(role.config))) == []


GOOD = [
    '[node]\nhost = "203.0.113.7"\nudp_port = 0\n',
    '[overlay]\nbootstrap = ["198.51.100.1:7400"]\nrefresh_interval = 60\n',  # int for float
    '[storage]\nbackend = "redis"\nredis_url = "redis://:pw@db:6379/1"\n',
    "[admission]\ndisk_high_water = 1.0\npow_window_s = 3600\n",
    'log_level = "debug"\n',
]
BAD = [
    ("[node]\nudp_port = 70000\n", "node.udp_port"),
    ("[node]\ngrpc_port = -1\n", "node.grpc_port"),
    ('[node]\ngrpc_port = "7401"\n', "node.grpc_port"),
    ("[node]\nhots = 1\n", "node"),  # the schema names the table an unknown key is in
    ("[nodes]\nhost = 1\n", ""),
    ('[storage]\nbackend = "mysql"\n', "storage.backend"),
    ("[storage]\ngc_batch = 0\n", "storage.gc_batch"),
    ("[admission]\ndisk_high_water = 1.5\n", "admission.disk_high_water"),
    ("[admission]\nipv6_prefix_len = 129\n", "admission.ipv6_prefix_len"),
    ("[connections]\ngrpc_max_streams = 0\n", "connections.grpc_max_streams"),
    ("[overlay]\nallow_loopback = 1\n", "overlay.allow_loopback"),
    ('[overlay]\nbootstrap = "a:1"\n', "overlay.bootstrap"),
    ('log_level = "loud"\n', "log_level"),
]


@pytest.mark.parametrize("text", GOOD)
def test_what_the_loader_accepts_the_schema_accepts(text: str, tmp_path: Path) -> None:
    assert loader_error(STORAGE, text, tmp_path) is None
    assert schema_errors(STORAGE, tomllib.loads(text)) == []


@pytest.mark.parametrize(("text", "where"), BAD)
def test_what_the_loader_refuses_the_schema_refuses_at_the_same_key(
    text: str, where: str, tmp_path: Path
) -> None:
    error = loader_error(STORAGE, text, tmp_path)
    assert error is not None and error.source == str(tmp_path / "node.toml")
    assert error.key.startswith(where), (error.key, where)
    assert schema_errors(STORAGE, tomllib.loads(text)) == [where]
