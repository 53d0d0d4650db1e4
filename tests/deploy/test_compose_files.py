"""The compose testnet's files without a Docker engine: generated from the one testnet
topology and current, accepted by docker-compose, in agreement with `dna-testnet`; and the
Dockerfile copies every workspace member's project file (or `uv sync --locked` fails)."""

from __future__ import annotations

import glob
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from containers import COMPOSE, ROOT
from dna_stun.config import StunServiceConfig, config_warnings
from dna_testnet.compose import (
    NODES_DIR,
    PROMETHEUS_FILE,
    compose_subnets,
    document,
    node_address,
    relay_address,
    render,
    stale_files,
)
from dna_testnet.network import Testnet
from dna_testnet.topology import TESTNET, UDP_PORT, make_topology

pytestmark = pytest.mark.process  # the generator and docker-compose

# Where a node runs (addresses, paths) differs by driver by construction...
LOCATION = {
    ("node", "host"), ("node", "key_file"), ("overlay", "bootstrap"),
    ("overlay", "allow_loopback"), ("ops", "http_host"), ("records", "path"),
    ("storage", "data_dir"),
}  # fmt: skip
# ...and so do these, on purpose (topology.py, compose.py say why).
COMPOSE_ONLY = {("storage", "backend"), ("storage", "redis_url"), ("storage", "repair_interval_s")}


def test_generated_files_are_current() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gen_compose.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_check_names_a_stale_file(tmp_path: Path) -> None:
    """The currency check can fail: a copy with one node file edited is reported."""
    for path, text in render(TESTNET).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert stale_files(tmp_path, TESTNET) == []
    edited = tmp_path / NODES_DIR / "storage3.toml"
    edited.write_text(edited.read_text().replace("puzzle_bits = 4", "puzzle_bits = 5"))
    (tmp_path / NODES_DIR / "storage9.toml").write_text("")
    assert stale_files(tmp_path, TESTNET) == [
        f"{NODES_DIR}/storage3.toml",
        f"{NODES_DIR}/storage9.toml",
    ]


@pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]])
def test_docker_compose_accepts_the_file(profile: list[str]) -> None:
    done = subprocess.run(
        [*COMPOSE, *profile, "config", "-q"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_docker_compose_names_a_bad_key(tmp_path: Path) -> None:
    good = (ROOT / "docker-compose.yml").read_text()
    bad = good.replace("    init: true\n", "    inti: true\n", 1)
    (tmp_path / "docker-compose.yml").write_text(bad)
    done = subprocess.run(
        [*COMPOSE, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "inti" in done.stderr, done.stderr


def _flat(toml: str) -> dict[tuple[str, str], Any]:
    return {
        (section, key): value
        for section, table in tomllib.loads(toml).items()
        if isinstance(table, dict)
        for key, value in table.items()
    }


def test_dna_testnet_and_compose_run_the_same_nodes_with_the_same_settings(tmp_path: Path) -> None:
    local = Testnet(tmp_path)
    assert [(n.name, n.role, n.command) for n in local.nodes] == [
        (n.name, n.role, n.command) for n in TESTNET.nodes
    ]
    files = render(TESTNET)
    for node in local.nodes:
        node.root.mkdir(parents=True, exist_ok=True)
        node.write_config()
        ours = _flat(node.config_path.read_text())
        theirs = _flat(files[f"{NODES_DIR}/{node.name}.toml"])
        differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        assert differ <= LOCATION | COMPOSE_ONLY, (node.name, differ - LOCATION - COMPOSE_ONLY)
        assert theirs[("node", "host")] == node_address(TESTNET, node.name)
        assert theirs[("overlay", "bootstrap")] == [
            f"{node_address(TESTNET, b.name)}:{UDP_PORT}" for b in TESTNET.bootstraps
        ]


# The relay's settings that differ by driver: where it runs and which private networks its
# peers live on (loopback locally, the compose networks in compose), and compose's narrow
# relay range (published ranges want to be short) and the allocations it holds.
RELAY_LOCATION = {("server", "host"), ("ops", "http_host"), ("relay", "allowed_peers")}
RELAY_COMPOSE_ONLY = {
    ("server", "relay_port_min"),
    ("server", "relay_port_max"),
    ("relay", "max_allocations"),
}


def test_dna_testnet_and_compose_run_the_same_relay(tmp_path: Path) -> None:
    local = Testnet(tmp_path, stun=len(TESTNET.relays))
    assert [r.name for r in local.relays] == [r.name for r in TESTNET.relays]
    files = render(TESTNET)
    for relay in local.relays:
        relay.write_config()
        ours = _flat(relay.config_path.read_text())
        theirs = _flat(files[f"{NODES_DIR}/{relay.name}.toml"])
        differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        assert differ == RELAY_LOCATION | RELAY_COMPOSE_ONLY, relay.name
        assert theirs[("auth", "auth_secret")] == ours[("auth", "auth_secret")]


def test_compose_services_follow_the_topology() -> None:
    services = document(TESTNET)["services"]
    for spec in TESTNET.nodes:
        service = services[spec.name]
        assert service["image"].startswith(f"dna-{spec.role}:")
        assert service["init"] and service["read_only"]
    redis_urls = [
        _flat(render(TESTNET)[f"{NODES_DIR}/{n.name}.toml"]).get(("storage", "redis_url"))
        for n in TESTNET.storage
    ]
    on_redis = [url for url in redis_urls if url is not None]
    assert len(on_redis) == sum(n.backend == "redis" for n in TESTNET.storage) == 2
    assert len(set(on_redis)) == len(on_redis)  # one database per node
    assert all(s.get("init") for s in services.values())  # every service: quick stops
    for peer in TESTNET.peers:
        assert services[f"{peer.name}-router"]["command"][1] == peer.nat
        assert services[peer.name]["network_mode"] == f"service:{peer.name}-netns"
    assert services["prometheus"]["profiles"] == ["monitoring"]
    scraped = render(TESTNET)[PROMETHEUS_FILE]
    assert all(f"{n.name}:7480" in scraped for n in TESTNET.nodes + TESTNET.relays)


def test_the_relay_is_a_stun_container_relaying_to_the_compose_networks_only() -> None:
    services = document(TESTNET)["services"]
    assert [r.name for r in TESTNET.relays] == ["stun1"]
    relay = services["stun1"]
    assert relay["image"].startswith("dna-stun:") and relay["init"] and relay["read_only"]
    assert relay["healthcheck"]["test"][-1].endswith("healthcheck.py")
    assert relay["expose"] == ["3478/udp", "49152-49251/udp"]
    address = relay["networks"]["internet"]["ipv4_address"]
    assert address == relay_address(TESTNET, "stun1")
    node_addresses = {node_address(TESTNET, n.name) for n in TESTNET.nodes}
    assert address not in node_addresses
    config = tomllib.loads(render(TESTNET)[f"{NODES_DIR}/stun1.toml"])
    assert config["server"]["host"] == address
    assert (config["server"]["relay_port_min"], config["server"]["relay_port_max"]) == (
        49152,
        49251,
    )
    # Exactly the compose networks, spelled out: a public relay refuses private addresses.
    assert config["relay"]["allowed_peers"] == ["10.77.0.0/16", "10.78.1.0/24", "10.78.2.0/24"]
    assert config["relay"]["allowed_peers"] == compose_subnets(TESTNET)
    accepted = StunServiceConfig.model_validate(config)  # the file is one dna-stun accepts
    # An allocation takes a relay port: no more allocations than the 100 ports (dna-stun
    # warns otherwise, and would refuse the 101st after 64 bind tries).
    assert config["relay"]["max_allocations"] == 100
    assert not [w for w in config_warnings(accepted, 1 << 20) if "port range" in w]


def test_a_topology_with_more_redis_nodes_than_storage_nodes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"redis must be 0\.\.2"):
        make_topology(1, 2, redis=3)


def test_the_dockerfile_copies_every_workspace_members_project_file() -> None:
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    members = sorted(
        str(Path(path).relative_to(ROOT))
        for pattern in workspace["members"]
        for path in glob.glob(str(ROOT / pattern))
        if (Path(path) / "pyproject.toml").exists()
    )
    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    missing = [m for m in members if f"COPY {m}/pyproject.toml {m}/" not in dockerfile]
    assert members and missing == []
