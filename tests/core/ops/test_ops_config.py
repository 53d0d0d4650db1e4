"""Node configuration: defaults < TOML file < environment, and every way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
from dna_core.errors import DnaError
from dna_core.ops.config import (
    ConfigError,
    ConfigModel,
    ConfigPath,
    Secret,
    SecretStr,
    Strings,
    dump_config,
    load_config,
)
from dna_core.overlay.aio.server import OverlayServiceConfig
from dna_storage.cli import ENV_PREFIX as STORAGE_ENV
from dna_storage.node import StorageNodeConfig
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Mailbox(ConfigModel):
    ttl_days: int = 30
    quota_mb: float = 64.0
    dir: ConfigPath = Path("/var/lib/dna")
    backends: Strings = ("sqlite",)


class Http(ConfigModel):
    host: str = "127.0.0.1"
    port: int = 8080
    access_log: bool = False


class NodeConfig(ConfigModel):
    name: str = "node"
    bootstrap: list[str] = Field(default_factory=list)
    redis_password: Annotated[str, Secret()] = ""
    mailbox: Mailbox = Mailbox()
    http: Http = Http(port=9100)


class Required(ConfigModel):
    key_file: ConfigPath


class Checked(ConfigModel):
    port: int = 1

    @model_validator(mode="after")
    def _in_range(self) -> Checked:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        return self


class Unsupported(ConfigModel):
    anything: dict[str, str] = Field(default_factory=dict)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def load(path: Path | None = None, **env: str) -> NodeConfig:
    return load_config(NodeConfig, path, env_prefix="DNA", env=env)


def error(path: Path | None = None, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, **env)
    return info.value


# --- values and precedence ----------------------------------------------------------------------


def test_defaults_only() -> None:
    cfg = load()
    assert cfg == NodeConfig()
    assert cfg.http.port == 9100  # the enclosing default instance, not Http()'s own default


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        name = "storage-1"
        bootstrap = ["10.0.0.1:4000", "10.0.0.2:4000"]
        [mailbox]
        ttl_days = 7
        quota_mb = 128        # an int where a float is expected widens
        dir = "/srv/dna"
        backends = ["sqlite", "redis"]
        [http]
        access_log = true
        """,
    )
    cfg = load(path)
    assert cfg.name == "storage-1"
    assert cfg.bootstrap == ["10.0.0.1:4000", "10.0.0.2:4000"]
    assert cfg.mailbox == Mailbox(
        ttl_days=7, quota_mb=128.0, dir=Path("/srv/dna"), backends=("sqlite", "redis")
    )
    assert isinstance(cfg.mailbox.quota_mb, float)
    assert cfg.http == Http(port=9100, access_log=True)  # unset fields keep their default


def test_env_overrides_file(tmp_path: Path) -> None:
    path = toml(tmp_path, 'name = "from-file"\n[mailbox]\nttl_days = 7\nquota_mb = 1.5\n')
    cfg = load(
        path,
        DNA__NAME="from-env",
        DNA__MAILBOX__TTL_DAYS="3",
        DNA__BOOTSTRAP=" a:1, b:2 ,,",
        DNA__MAILBOX__BACKENDS="redis",
        DNA__MAILBOX__DIR="/data",
        DNA__HTTP__ACCESS_LOG="yes",
        DNA__REDIS_PASSWORD="hunter2",
    )
    assert cfg.name == "from-env"
    assert cfg.mailbox.ttl_days == 3
    assert cfg.mailbox.quota_mb == 1.5  # from the file, env did not touch it
    assert cfg.mailbox.backends == ("redis",)
    assert cfg.mailbox.dir == Path("/data")
    assert cfg.bootstrap == ["a:1", "b:2"]
    assert cfg.http.access_log is True
    assert cfg.redis_password == "hunter2"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("yes", True)],
        *[("false", False), ("0", False), ("No", False), (" no ", False)],
    ],
)
def test_env_booleans(text: str, value: bool) -> None:
    assert load(DNA__HTTP__ACCESS_LOG=text).http.access_log is value


def test_env_without_our_prefix_is_ignored() -> None:
    cfg = load(DNA_OTHER__NAME="x", DNAX__NAME="y", PATH="/bin", dna__name="lower")
    assert cfg == NodeConfig()


def test_empty_list_from_env() -> None:
    assert load(DNA__BOOTSTRAP="").bootstrap == []


def test_prefix_is_matched_upper_case() -> None:
    cfg = load_config(NodeConfig, None, env_prefix="dna_storage", env={"DNA_STORAGE__NAME": "s"})
    assert cfg.name == "s"


def test_required_field_from_env() -> None:
    cfg = load_config(Required, None, env_prefix="N", env={"N__KEY_FILE": "/k"})
    assert cfg.key_file == Path("/k")


def test_is_a_dna_error() -> None:
    assert issubclass(ConfigError, DnaError)


# --- errors: each names the key and where it came from -------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = toml(tmp_path, "[mailbox]\nttl_dayz = 3\n")
    err = error(path)
    assert (err.source, err.key) == (str(path), "mailbox.ttl_dayz")
    assert str(path) in str(err)
    assert "unknown key" in str(err)
    assert "mailbox.ttl_days" in str(err)  # the message lists what is known


def test_unknown_section_in_file(tmp_path: Path) -> None:
    err = error(toml(tmp_path, "[mailbx]\nttl_days = 3\n"))
    assert err.key == "mailbx"
    assert "unknown key" in err.problem


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[mailbox]\nttl_days = "7"\n', "mailbox.ttl_days", "expected int, got str '7'"),
        ("[mailbox]\nttl_days = 7.0\n", "mailbox.ttl_days", "expected int, got float"),
        ("[mailbox]\nttl_days = true\n", "mailbox.ttl_days", "expected int, got bool"),
        ("[mailbox]\nquota_mb = true\n", "mailbox.quota_mb", "expected float, got bool"),
        ('[http]\naccess_log = "yes"\n', "http.access_log", "expected bool, got str"),
        ("name = 5\n", "name", "expected str, got int"),
        ("[mailbox]\ndir = 5\n", "mailbox.dir", "expected Path, got int"),
        ('[mailbox]\ndir = ""\n', "mailbox.dir", "empty path"),
        ('bootstrap = "a,b"\n', "bootstrap", "expected an array (list[str]), got str"),
        ("bootstrap = [1, 2]\n", "bootstrap", "expected str, got int"),
        ("mailbox = 3\n", "mailbox", "expected a table [mailbox], got int"),
        ("[name]\nx = 1\n", "name", "expected str, got dict"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = toml(tmp_path, text)
    err = error(path)
    assert (err.source, err.key) == (str(path), key)
    assert expected in err.problem


def test_invalid_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, "name = \n")
    err = error(path)
    assert err.source == str(path)
    assert "invalid TOML" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = error(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(err)
    # A new operator running the README's `run --config bootstrap.toml` is told how to get one.
    assert "not found (`print-default-config > FILE` writes one to start from)" in str(err)


def test_unreadable_file(tmp_path: Path) -> None:
    err = error(tmp_path)  # a directory: open() fails with an OSError
    assert "cannot read" in str(err)


@pytest.mark.parametrize(
    ("var", "value", "key", "expected"),
    [
        ("DNA__MAILBOX__TTL_DAYS", "seven", "mailbox.ttl_days", "cannot parse 'seven' as int"),
        ("DNA__MAILBOX__QUOTA_MB", "lots", "mailbox.quota_mb", "cannot parse 'lots' as float"),
        ("DNA__HTTP__ACCESS_LOG", "maybe", "http.access_log", "cannot parse 'maybe' as bool"),
        ("DNA__MAILBOX__DIR", "", "mailbox.dir", "empty path"),
        ("DNA__MAILBOX__TTL_DAYZ", "3", "mailbox.ttl_dayz", "unknown key (known: mailbox."),
        ("DNA__MAILBX__TTL_DAYS", "3", "mailbx", "unknown key (known: name,"),
        ("DNA__NAMES", "x", "names", "unknown key"),
        ("DNA__NAME__X", "x", "name.x", "name is a str, not a section"),
        ("DNA__MAILBOX", "x", "mailbox", "is a section: set DNA__MAILBOX__<FIELD>"),
        ("DNA__", "x", "", "unknown key"),
    ],
)
def test_bad_env(var: str, value: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(NodeConfig, None, env_prefix="DNA", env={var: value})
    err = info.value
    assert (err.source, err.key) == (var, key)
    assert expected in err.problem
    assert str(err).startswith(f"{var}: ")


def test_missing_required_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Required, None, env_prefix="N", env={})
    assert info.value.key == "key_file"
    assert "N__KEY_FILE" in str(info.value)


def test_dataclass_validation_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match="port 0 out of range"):
        load_config(Checked, None, env_prefix="N", env={"N__PORT": "0"})


def test_unsupported_annotation_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="unsupported config field type"):
        load_config(Unsupported, None, env_prefix="N", env={})


def test_not_a_config_model() -> None:
    with pytest.raises(TypeError, match="needs a ConfigModel"):
        load_config(dict, None, env_prefix="N", env={})  # type: ignore[type-var]


# --- dump ---------------------------------------------------------------------------------------


def test_dump_is_json_ready_and_masks_secrets() -> None:
    cfg = load(DNA__REDIS_PASSWORD="hunter2", DNA__BOOTSTRAP="a:1")
    dumped = dump_config(cfg)
    assert json.loads(json.dumps(dumped)) == dumped
    assert dumped["redis_password"] == "***"
    assert "hunter2" not in json.dumps(dumped)
    assert dumped["mailbox"] == {
        "ttl_days": 30,
        "quota_mb": 64.0,
        "dir": "/var/lib/dna",
        "backends": ["sqlite"],
    }
    assert dumped["bootstrap"] == ["a:1"]
    assert dumped["http"]["port"] == 9100


def test_dump_rejects_what_is_not_a_config_model() -> None:
    with pytest.raises(TypeError):
        dump_config({"a": 1})  # type: ignore[arg-type]


class WithSecret(ConfigModel):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    token: SecretStr = SecretStr("")


def test_a_secret_is_masked_however_the_config_is_printed(tmp_path: Path) -> None:
    path = toml(tmp_path, 'url = "redis://user:pa55@db.internal:6380/2"\n')
    config = load_config(WithSecret, path, env_prefix="T", env={"T__TOKEN": "tok3n"})
    assert config.url.reveal() == "redis://user:pa55@db.internal:6380/2"
    assert config.token.reveal() == "tok3n"
    printed = [repr(config), str(config), json.dumps(dump_config(config)), f"{config.url}"]
    for text in printed:
        assert "pa55" not in text and "tok3n" not in text, text
    assert dump_config(config) == {"url": "redis://user:***@db.internal:6380/2", "token": "***"}
    # Nothing secret in a URL without a password: it is shown whole.
    assert dump_config(WithSecret())["url"] == "redis://127.0.0.1:6379/0"


# --- the names are pydantic-settings' own ------------------------------------------------------


def test_our_variable_names_are_what_stock_pydantic_settings_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`DNA_STORAGE__SECTION__KEY` is pydantic-settings' form with env_prefix `DNA_STORAGE__`
    and env_nested_delimiter `__`: a stock BaseSettings reads the same variables the same way
    (a list as a JSON array, its form; ours also takes a comma-separated one)."""
    env = {
        "DNA_STORAGE__LOG_LEVEL": "debug",
        "DNA_STORAGE__NODE__HOST": "203.0.113.7",
        "DNA_STORAGE__NODE__UDP_PORT": "7500",
        "DNA_STORAGE__OVERLAY__BOOTSTRAP": '["198.51.100.1:7400", "198.51.100.2:7400"]',
        "DNA_STORAGE__OVERLAY__ALLOW_LOOPBACK": "true",
        "DNA_STORAGE__STORAGE__REDIS_URL": "redis://:pw@db:6379/1",
        "DNA_STORAGE__ADMISSION__DISK_HIGH_WATER": "0.5",
    }

    class Stock(StorageNodeConfig, BaseSettings):
        model_config = SettingsConfigDict(env_prefix="DNA_STORAGE__", env_nested_delimiter="__")

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    stock = StorageNodeConfig.model_validate(dict(Stock()))
    ours = load_config(StorageNodeConfig, None, env_prefix=STORAGE_ENV, env=env)
    assert ours == stock
    assert ours.node.udp_port == 7500 and ours.admission.disk_high_water == 0.5
    assert ours.overlay.bootstrap == ("198.51.100.1:7400", "198.51.100.2:7400")
    assert ours.storage.redis_url.reveal() == "redis://:pw@db:6379/1"


class Vault(ConfigModel):
    url: SecretStr = SecretStr("redis://:default-pw@db:6379/0")
    key_file: Annotated[ConfigPath, Secret()] = Path("/keys/node.key")
    note: str = ""


class WithVault(ConfigModel):
    vault: Vault = Vault(url=SecretStr("redis://:own-pw@db2:6379/1"), key_file=Path("/own.key"))


def test_a_section_set_in_part_keeps_its_secret_defaults_unmasked(tmp_path: Path) -> None:
    """The other keys of a [section] come from the enclosing default instance; a secret among
    them is carried over as it is, not as its masked print."""
    config = load_config(WithVault, toml(tmp_path, '[vault]\nnote = "x"\n'), env_prefix="T", env={})
    assert config.vault.url.reveal() == "redis://:own-pw@db2:6379/1"
    assert config.vault.key_file == Path("/own.key")
    assert dump_config(config)["vault"] == {
        "url": "redis://:***@db2:6379/1",
        "key_file": "***",
        "note": "x",
    }


def test_a_check_across_keys_names_the_section_and_each_source(tmp_path: Path) -> None:
    path = toml(tmp_path, "[storage]\nttl_days = 10\n")
    env = {"DNA_STORAGE__STORAGE__MAX_TTL_DAYS": "5"}
    with pytest.raises(ConfigError) as info:
        load_config(StorageNodeConfig, path, env_prefix=STORAGE_ENV, env=env)
    err = info.value
    assert (err.source, err.key) == (f"{path}, DNA_STORAGE__STORAGE__MAX_TTL_DAYS", "storage")
    assert err.problem == "ttl_days must be > 0 and <= max_ttl_days"


@pytest.mark.parametrize(
    ("host", "said"),
    [("0.0.0.0", "cannot be reached"), ("::", "cannot be reached"),
     ("224.0.0.1", "cannot be reached"), ("example.com", "is not an IP address")],
)  # fmt: skip
def test_a_node_host_is_an_address_others_reach(host: str, said: str) -> None:
    """[node] host is bound and told to others: a name was a traceback at start (and in
    check-config), a wildcard an address other nodes drop as martian."""
    with pytest.raises(ConfigError) as info:
        load_config(OverlayServiceConfig, None, env_prefix="DNA_BOOTSTRAP",
                    env={"DNA_BOOTSTRAP__NODE__HOST": host})  # fmt: skip
    assert "DNA_BOOTSTRAP__NODE__HOST: node.host" in str(info.value), info.value
    assert said in str(info.value)
    ok = load_config(OverlayServiceConfig, None, env_prefix="DNA_BOOTSTRAP",
                     env={"DNA_BOOTSTRAP__NODE__HOST": "2001:db8::7"})  # fmt: skip
    assert ok.node.host == "2001:db8::7"
