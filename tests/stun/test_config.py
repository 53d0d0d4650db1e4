"""`dna-stun`'s configuration: what it refuses, what it masks, what the environment sets."""

from __future__ import annotations

from pathlib import Path

import pytest
from dna_core.ops.config import ConfigError, dump_config, load_config
from dna_stun.config import ENV_PREFIX, StunServiceConfig, config_warnings


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> StunServiceConfig:
    path = tmp_path / "stun.toml"
    path.write_text(text)
    return load_config(StunServiceConfig, path, env_prefix=ENV_PREFIX, env=env or {})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[auth]\nusers = ["no-colon"]\n', "auth.users"),
        ('[auth]\nusers = [":nameless"]\n', "auth.users"),
        ('[relay]\nallowed_peers = ["10.0.0.0/33"]\n', "relay.allowed_peers"),
        ("[server]\nrelay_port_min = 6000\nrelay_port_max = 5000\n", "server"),
        ('[server]\nhost = "stun.example.org"\n', "server.host"),
        ('[server]\nhost = "0.0.0.0"\n', "server"),
        ("[relay]\ndefault_lifetime_s = 7200\n", "relay"),
        ("[relay]\nbandwidth_bytes_per_s = -1\n", "relay.bandwidth_bytes_per_s"),
        ('[server]\nhost_ipv6 = "stun6.example.org"\n', "server.host_ipv6"),
        ('[server]\nhost_ipv6 = "198.51.100.9"\n', "server"),  # not IPv6
        ('[server]\nhost = "2001:db8::9"\nhost_ipv6 = "2001:db8::8"\n', "server"),
        ('[server]\nrelay_host_ipv6 = "::"\n', "server"),  # a wildcard tells clients nothing
        ('[server]\nhost = "2001:db8::9"\nrelay_host_ipv6 = "2001:db8::8"\n', "server"),
        # Values that would not fit their attribute on the wire: every answer would fail.
        ("[relay]\nmax_lifetime_s = 4294967296\n", "relay.max_lifetime_s"),
        (
            "[relay]\ndefault_lifetime_s = 4294967296\nmax_lifetime_s = 4294967296\n",
            "relay.default_lifetime_s",
        ),
        (f'[auth]\nrealm = "{"r" * 33}"\n', "auth.realm"),
        (f'[auth]\nrealm = "{"é" * 9}"\n', "auth.realm"),  # 9 characters, 18 bytes
        (f'[auth]\nrealm = "{"r" * 17}"\n', "auth.realm"),  # its 401 would not fit
        ('[auth]\nrealm = ""\n', "auth.realm"),
        ("[auth]\nnonce_lifetime_s = inf\n", "auth.nonce_lifetime_s"),
        ("[auth]\nnonce_lifetime_s = nan\n", "auth.nonce_lifetime_s"),
        ("[auth]\nnonce_lifetime_s = 1e15\n", "auth.nonce_lifetime_s"),
        ("[auth]\nnonce_lifetime_s = 0.5\n", "auth.nonce_lifetime_s"),  # stale when issued
        ("[auth]\nnonce_lifetime_s = 9.9\n", "auth.nonce_lifetime_s"),
        (f'[auth]\nusers = ["{"n" * 514}:pw"]\n', "auth.users"),
        ('[auth]\nusers = ["ann:one", "bob:x", "ann:two"]\n', "auth.users"),  # which is ann's?
        ("[auth]\nmax_credential_lifetime_s = 31536001\n", "auth.max_credential_lifetime_s"),
        ("[auth]\nmax_credential_lifetime_s = 0\n", "auth.max_credential_lifetime_s"),
    ],
)
def test_unusable_settings_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, text)
    assert raised.value.key == key


@pytest.mark.parametrize("key", ["host", "host_ipv6", "relay_host", "relay_host_ipv6"])
def test_a_name_for_an_address_says_what_to_set(tmp_path: Path, key: str) -> None:
    # Before: "'stun.example.org' does not appear to be an IPv4 or IPv6 address", which
    # said neither that a name cannot do nor what to put there.
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f'[server]\n{key} = "stun.example.org"\n')
    assert raised.value.key == f"server.{key}"
    assert "'stun.example.org' is not an IP address: set the address clients reach" in str(
        raised.value
    )


@pytest.mark.parametrize("key", ["allowed_peers", "denied_peers"])
def test_a_network_that_does_not_parse_says_how_to_write_one(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f'[relay]\n{key} = ["10.0.0.0/33"]\n')
    assert raised.value.key == f"relay.{key}"
    assert "'10.0.0.0/33' is not an address or network: write one as" in str(raised.value)


def test_secrets_are_masked_and_the_environment_overrides(tmp_path: Path) -> None:
    env = {"DNA_STUN__RELAY__ALLOWED_PEERS": "127.0.0.0/8,10.9.0.0/16"}
    config = load(tmp_path, '[auth]\nusers = ["u:p"]\nauth_secret = "s"\n', env)
    assert config.relay.allowed_peers == ("127.0.0.0/8", "10.9.0.0/16")
    assert config.auth.user_passwords() == {"u": "p"} and config.auth.secrets() == ["s"]
    dumped = dump_config(config)
    assert dumped["auth"]["users"] == "***" and dumped["auth"]["auth_secret"] == "***"
    assert any("allowed_peers" in w for w in config_warnings(config))


def test_no_users_is_shown_as_none_not_masked(tmp_path: Path) -> None:
    # check-config printed "users": "***" with no users at all, beside the warning that no
    # credentials were configured: the operator could not tell none from some.
    assert dump_config(load(tmp_path, ""))["auth"]["users"] == []
    assert dump_config(load(tmp_path, '[auth]\nusers = ["u:p"]\n'))["auth"]["users"] == "***"


@pytest.mark.parametrize(
    ("auth", "advice"),
    [
        ('previous_auth_secret = "s3kr1t-a"\n', "set the new secret in auth_secret"),
        (
            'auth_secret = "s3kr1t-b"\nprevious_auth_secret = "s3kr1t-b"\n',
            "set auth_secret to the new",
        ),
    ],
)
def test_a_half_done_secret_rotation_is_warned_about(
    tmp_path: Path, auth: str, advice: str
) -> None:
    warnings = config_warnings(load(tmp_path, "[auth]\n" + auth), 1 << 20)
    assert [w for w in warnings if "previous_auth_secret" in w and advice in w], warnings
    assert "s3kr1t" not in " ".join(warnings)  # no secret printed


def test_no_credentials_is_warned_about(tmp_path: Path) -> None:
    warnings = config_warnings(load(tmp_path, ""))
    assert any("every TURN request will be refused" in w for w in warnings)


def test_each_warning_says_what_to_do(tmp_path: Path) -> None:
    # Before, three of them said what was wrong and stopped there.
    text = "[server]\nrelay_port_min = 50000\nrelay_port_max = 50099\n"
    warnings = config_warnings(load(tmp_path, text), 1 << 20)
    assert len(warnings) == 3, warnings
    for warning, advice in zip(
        warnings,
        (
            'set auth_secret (time-limited credentials) or users = ["name:password"]',
            "widen the range (and the firewall's) or lower [relay] max_allocations",
            "set [server] host to the address clients reach",
        ),
        strict=True,
    ):
        assert warning.endswith(advice), warning


def test_more_allocations_than_descriptors_is_warned_about(tmp_path: Path) -> None:
    # A relay socket per allocation: with systemd's soft limit of 1024 the default 1000
    # allocations left the ops HTTP server without descriptors (its health checks failing).
    config = load(tmp_path, '[auth]\nusers = ["u:p"]\n[relay]\nmax_allocations = 1000\n')
    [warning] = [w for w in config_warnings(config, 1024) if "descriptors" in w]
    assert "max_allocations = 1000 needs about 1064 file descriptors" in warning
    assert not [w for w in config_warnings(config, 1064) if "descriptors" in w]


def test_a_relay_port_range_smaller_than_max_allocations_is_warned_about(tmp_path: Path) -> None:
    text = '[auth]\nusers = ["u:p"]\n[server]\nrelay_port_min = 50000\nrelay_port_max = 50099\n'
    [warning] = [w for w in config_warnings(load(tmp_path, text)) if "port range" in w]
    assert "holds 100 ports, fewer than max_allocations = 1000" in warning
    enough = text + "[relay]\nmax_allocations = 100\n"
    assert not [w for w in config_warnings(load(tmp_path, enough)) if "port range" in w]


def test_relay_addresses_per_family(tmp_path: Path) -> None:
    both = load(tmp_path, '[server]\nhost = "198.51.100.9"\nrelay_host_ipv6 = "2001:db8::9"\n')
    assert both.server.relay_ips() == {0x01: "198.51.100.9", 0x02: "2001:db8::9"}
    assert load(tmp_path, '[server]\nhost = "2001:db8::9"\n').server.relay_ips() == {
        0x02: "2001:db8::9"
    }
