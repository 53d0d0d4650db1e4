"""The harness's compose driver on real containers: one storage node in a compose project
of its own (its own subnet, so it runs beside a compose testnet), started, frozen, thawed,
SIGKILLed, wiped and started again as a new node, then brought down with its volume.

The image is `make images`' dna-storage (built here, cached, when absent)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from containers import build_images, docker, ensure_engine
from dna_testnet.compose import CONTAINER_PATHS, NODE_HEALTHCHECK
from dna_testnet.harness.containers import ComposeDriver, DockerError, compose_cluster
from dna_testnet.topology import NodeSpec, Topology, node_toml

pytestmark = [pytest.mark.timeout(600), pytest.mark.process]  # docker, compose

NODE = "storage1"
SUBNET, ADDRESS = "10.93.0.0/24", "10.93.0.10"  # not the compose testnet's 10.77/10.78


def _compose_file(project_dir: Path) -> None:
    spec = NodeSpec(NODE, "storage")
    (project_dir / "node.toml").write_text(
        node_toml(spec, host=ADDRESS, seeds=[], paths=CONTAINER_PATHS, http_host="0.0.0.0",
                  allow_loopback=False)
    )  # fmt: skip
    service = {
        "image": "dna-storage:local", "init": True, "read_only": True, "tmpfs": ["/tmp"],
        "volumes": ["./node.toml:/etc/dna/node.toml:ro", f"{NODE}-data:/var/lib/dna"],
        "networks": {"net": {"ipv4_address": ADDRESS}},
        "healthcheck": {**NODE_HEALTHCHECK, "interval": "2s"},
    }  # fmt: skip
    document = {
        "version": "2.4",
        "services": {NODE: service},
        "networks": {"net": {"ipam": {"config": [{"subnet": SUBNET}]}}},
        "volumes": {f"{NODE}-data": {}},
    }
    # JSON is YAML: compose reads it as the compose file.
    (project_dir / "docker-compose.yml").write_text(json.dumps(document, indent=1))


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[ComposeDriver]:
    ensure_engine()
    # `image ls -q` prints nothing for a missing image (`image inspect` prints "[]"): on a
    # new machine the image is built here, not pulled from a registry that is not there.
    if docker("image", "ls", "-q", "dna-storage:local").strip() == "":
        build_images()
    _compose_file(tmp_path)
    project = f"dnadriver{uuid.uuid4().hex[:8]}"
    compose = ComposeDriver(project, {"PATH": "/usr/bin:/bin"}, tmp_path)
    try:
        yield compose
    finally:
        compose.run("down", "-v", "--remove-orphans", timeout=300)
        left = docker(
            "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"
        )
        assert left.split() == [], left


def test_the_compose_driver_freezes_kills_wipes_and_restarts_a_node_container(
    driver: ComposeDriver,
) -> None:
    cluster = compose_cluster(Topology((NodeSpec(NODE, "storage"),)), driver.project,
                              driver.env, driver.workdir)  # fmt: skip
    cluster.driver._ids = driver._ids  # one cache of container IDs for both handles
    compose = cluster.driver
    cluster.start(timeout=120)
    assert cluster.address(NODE).host == NODE  # reached by service name on its network
    first_id = json.loads(compose.exec(NODE, "python3", "-c", STATUS))["node_id"]

    compose.pause(NODE)
    assert compose.is_running(NODE) and not compose.is_ready(NODE)
    assert compose.state(NODE)["Paused"]
    compose.resume(NODE)
    cluster.wait_ready([NODE], timeout=60)

    with pytest.raises(DockerError, match="storage1 is running: stop or kill it"):
        compose.wipe(NODE)
    volume = compose.volumes(NODE)
    assert len(volume) == 1, volume
    compose.kill(NODE)
    assert compose.state(NODE)["ExitCode"] == 137  # SIGKILL: no drain, no goodbye
    assert not compose.is_running(NODE)
    compose.wipe(NODE)
    assert docker("volume", "ls", "-q", "--filter", f"name={volume[0]}").split() == []

    cluster.start([NODE], timeout=120)  # a new container on an empty volume
    assert json.loads(compose.exec(NODE, "python3", "-c", STATUS))["node_id"] != first_id
    assert "minted a new node key" in compose.logs(NODE)
    compose.restart(NODE)
    cluster.wait_ready([NODE], timeout=120)


# The node's /status from inside its container (the host may not reach container addresses).
STATUS = (
    "import urllib.request\n"
    "print(urllib.request.urlopen('http://127.0.0.1:7480/status', timeout=10).read().decode())"
)
