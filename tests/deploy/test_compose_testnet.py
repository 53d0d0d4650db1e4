"""The compose testnet on real containers (issue 13, item 3): the images build (cached),
docker-compose.yml comes up with the monitoring profile's Prometheus, every container
turns healthy, alice and bob talk through their NAT routers, bob receives what alice sent
while his container was stopped, a storage container SIGKILLed under traffic comes back and
nothing alice sent is lost, and Prometheus scrapes every node and answers a query on the
replica-count histogram. Everything comes down with its volumes.

The tests share one testnet (module scope) and run in file order. No skip: a machine
without Docker gets it installed by `make test` (scripts/bootstrap.sh) and the engine
started here (scripts/dockerd.sh); if that fails, the tests fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from containers import DOCKER, Compose, DockerError, build_images, docker, ensure_engine
from dna_testnet.compose import INTERNET, peer_lan, relay_address
from dna_testnet.topology import TESTNET

# A cold build (no cache, no base image) takes minutes; warm, the whole module ~3 minutes.
pytestmark = [pytest.mark.timeout(1500), pytest.mark.process]  # docker, compose, images.sh

PROJECT = "dnaci"
GRAFANA = "grafana"  # pulled from a registry: not started here (none is reachable)
NODES = [n.name for n in TESTNET.nodes]
RELAYS = [r.name for r in TESTNET.relays]
STORAGE = [n.name for n in TESTNET.storage]
PEERS = [p.name for p in TESTNET.peers]
KILLED = "storage2"


def _services(compose: Compose) -> list[str]:
    listed = compose.run("--profile", "monitoring", "config", "--services").split()
    return [s for s in listed if s != GRAFANA]


def _refuse_a_running_testnet() -> None:
    """Another project of this compose file holds the fixed subnets: say so plainly."""
    for net in docker("network", "ls", "-q").split():
        info = json.loads(docker("network", "inspect", net))[0]
        subnets = [c.get("Subnet") for c in (info.get("IPAM") or {}).get("Config") or []]
        project = (info.get("Labels") or {}).get("com.docker.compose.project")
        if INTERNET in subnets and project != PROJECT:
            raise AssertionError(
                f"a compose testnet (project {project!r}) holds {INTERNET}: stop it first"
                f" (docker-compose -p {project} down -v)"
            )


@pytest.fixture(scope="module")
def images() -> str:
    """`make images`' builds (cached); what it printed: each image with its size."""
    start = time.monotonic()
    ensure_engine()
    built = build_images()
    print(f"images built in {time.monotonic() - start:.0f} s\n{built}")
    return built


ROLE_IMAGES = {
    "dna-bootstrap": "bootstrap",
    "dna-storage": "storage",
    "dna-stun": "stun",
    "dna-peer": "peer",
}
# A relay keeps nothing on disk (allocations live in memory): the one role without a volume.
STATELESS = {"dna-stun"}


@pytest.mark.parametrize("image", sorted(ROLE_IMAGES))
def test_a_role_image_is_small_non_root_labelled_and_checks_its_health(
    images: str, image: str
) -> None:
    info = json.loads(docker("image", "inspect", f"{image}:local"))[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert ("/var/lib/dna" in (config["Volumes"] or {})) == (image not in STATELESS)
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == image
    assert (
        labels["org.opencontainers.image.version"] and labels["org.opencontainers.image.revision"]
    )
    assert info["Size"] <= 250_000_000, f"{image}: {info['Size'] / 1e6:.0f} MB"
    # Only the role's package (and dna-core) in its environment.
    present = docker("run", "--rm", "--entrypoint", "ls", f"{image}:local", "/opt/venv/bin")
    others = {"dna-bootstrap", "dna-storage-node", "dna-testnet", "dna-sim", "dna-stun"}
    own = {
        "bootstrap": "dna-bootstrap",
        "storage": "dna-storage-node",
        "stun": "dna-stun",
        "peer": "dna",
    }
    assert set(present.split()) & others <= {own[ROLE_IMAGES[image]]}, present
    assert own[ROLE_IMAGES[image]] in present.split()


@pytest.mark.parametrize(("image", "prefix"), [("dna-bootstrap", "DNA_BOOTSTRAP"),
                                               ("dna-storage", "DNA_STORAGE")])  # fmt: skip
def test_a_node_container_with_a_bad_setting_exits_with_one_line(
    images: str, image: str, prefix: str
) -> None:
    done = subprocess.run(
        [DOCKER, "run", "--rm", "-e", f"{prefix}__NODE__GRPC_PORT=99999", f"{image}:local"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"{image.replace('dna-storage', 'dna-storage-node')}: error: {prefix}__NODE__GRPC_PORT:"
        " node.grpc_port: input should be less than or equal to 65535, got 99999"
    ], done.stderr


def test_the_stun_image_without_a_relay_address_exits_with_one_line(images: str) -> None:
    """The image listens on 0.0.0.0: it cannot guess the address clients are told."""
    done = subprocess.run(
        [DOCKER, "run", "--rm", "dna-stun:local"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "dna-stun: error: /etc/dna/stun.toml: server: relay_host must be an address clients"
        " reach (host is a wildcard)"
    ], done.stderr


@pytest.fixture(scope="module")
def testnet(images: str) -> Iterator[Compose]:
    _refuse_a_running_testnet()
    # Prometheus on any free host port: the test reaches it through `docker exec`.
    env = dict(os.environ, DNA_PROMETHEUS_PORT="")
    compose = Compose(PROJECT, env)
    compose.run("--profile", "monitoring", "down", "-v", "--remove-orphans")  # a crashed run
    services = _services(compose)
    try:
        start = time.monotonic()
        compose.run("--profile", "monitoring", "up", "-d", *services, timeout=600)
        print(f"compose up -d returned after {time.monotonic() - start:.0f} s")
        compose.wait_healthy(services)
        print(f"every container healthy after {time.monotonic() - start:.0f} s")
        yield compose
    finally:
        try:
            _print_logs(compose, [*STORAGE, *PEERS])
        finally:  # a failed `up` must not leave its networks: the next project's overlap them
            compose.run("--profile", "monitoring", "down", "-v", "--remove-orphans", timeout=300)
    project = f"label=com.docker.compose.project={PROJECT}"
    leftovers = docker("volume", "ls", "-q", "--filter", project)
    assert leftovers.split() == [], leftovers


def _print_logs(compose: Compose, services: list[str]) -> None:
    """Each service's last log lines, for the report; a service whose container was never
    created (a failed `up`) says so instead of ending the dump."""
    for service in services:
        try:
            tail = compose.logs(service)[-2000:]
        except DockerError as err:
            tail = str(err)
        print(f"--- {service}\n{tail}")


def _received(compose: Compose, peer: str) -> list[dict[str, Any]]:
    """The messages `dna watch --json` printed in the peer's log (one JSON line each)."""
    out = docker("logs", compose.container(peer), timeout=60)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [m for m in lines if "message_id" in m]


def _wait_received(
    compose: Compose, peer: str, texts: set[str], timeout: float = 120
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = {m["text"]: m for m in _received(compose, peer) if m["text"] in texts}
        if set(got) == texts or time.monotonic() > deadline:
            return got
        time.sleep(2)


def _send(compose: Compose, sender: str, to: str, text: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(
        compose.exec(sender, "dna", "--json", "send", to, text, timeout=180)
    )
    return answer


def test_alice_and_bob_greet_each_other_through_their_nats(testnet: Compose) -> None:
    for peer in TESTNET.peers:
        greeting = f"hello {peer.name}, this is {peer.contact}"
        got = _wait_received(testnet, peer.name, {greeting})
        assert greeting in got, f"{peer.name} got no {greeting!r}: {_received(testnet, peer.name)}"
        message = got[greeting]
        assert message["from"]["name"] == peer.contact and not message["outgoing"]


def _online(compose: Compose, who: str, contact: str) -> bool:
    listed = json.loads(
        compose.exec(who, "dna", "--json", "contacts", "list", "--online", timeout=120)
    )
    return any(c["name"] == contact and c["online"] for c in listed)


def test_alice_reaches_bob_directly_through_their_nats(testnet: Compose) -> None:
    """bob watches (online: presence, candidates sealed to alice); alice behind a
    port-preserving NAT, bob behind a symmetric one: ICE pairs them through the relay."""
    deadline = time.monotonic() + 90
    while not _online(testnet, "alice", "bob"):
        assert time.monotonic() < deadline, "alice never saw bob online"
        time.sleep(3)
    text = f"direct {uuid.uuid4().hex}"
    sent = _send(testnet, "alice", "bob", text)
    assert sent["path"] == "direct", sent
    assert "relay" in sent["route"], sent  # a symmetric NAT on one side: a relayed pair
    got = _wait_received(testnet, "bob", {text})
    assert got[text]["message_id"] == sent["message_id"]


ECHO = """
import socket, select
socks = []
for port in (40100, 40101):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); socks.append(s)
for _ in range(8):
    ready, _, _ = select.select(socks, [], [], 60)
    for s in ready:
        data, (ip, port) = s.recvfrom(100)
        s.sendto(f"{ip}:{port}".encode(), (ip, port))
"""

PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000)); s.settimeout(10)
for port in (40100, 40101):
    s.sendto(b"?", (sys.argv[1], port)); print(s.recvfrom(100)[0].decode())
"""


def test_the_routers_map_like_their_nat_kinds(testnet: Compose) -> None:
    """Seen from the internet: alice's router keeps her source port for every destination
    (port-preserving), bob's picks another port per destination (symmetric); both show the
    router's address, never the LAN's."""
    echo_host = "bootstrap1"
    echo_ip = json.loads(docker("inspect", testnet.container(echo_host)))[0]["NetworkSettings"][
        "Networks"
    ][f"{PROJECT}_internet"]["IPAddress"]
    docker("exec", "-d", testnet.container(echo_host), "python3", "-c", ECHO)
    time.sleep(1)
    for peer in TESTNET.peers:
        router_ip = peer_lan(TESTNET, peer.name).router_internet
        seen = testnet.exec(f"{peer.name}-netns", "python3", "-c", PROBE, echo_ip).split()
        addresses = [s.rsplit(":", 1) for s in seen]
        assert [ip for ip, _ in addresses] == [router_ip, router_ip], seen
        ports = [int(port) for _, port in addresses]
        if peer.nat == "port-preserving":
            assert ports == [40000, 40000], seen
        else:
            assert ports[0] != ports[1], seen


def test_bob_gets_what_alice_sent_while_his_container_was_stopped(testnet: Compose) -> None:
    testnet.stop("bob")
    assert not testnet.state("bob")["Running"]
    text = f"while you were away {uuid.uuid4().hex}"
    sent = _send(testnet, "alice", "bob", text)
    assert sent["message_id"]
    testnet.start("bob")
    got = _wait_received(testnet, "bob", {text})
    assert text in got, f"bob never got it: {_received(testnet, 'bob')[-3:]}"
    assert got[text]["message_id"] == sent["message_id"]
    assert got[text]["from"]["name"] == "alice"


def test_a_storage_node_sigkilled_under_traffic_loses_nothing(testnet: Compose) -> None:
    texts = [f"under fire {i} {uuid.uuid4().hex}" for i in range(6)]
    acked: list[str] = []
    failures: list[str] = []

    def traffic() -> None:
        for text in texts:
            try:
                _send(testnet, "alice", "bob", text)
                acked.append(text)
            except DockerError as exc:
                failures.append(f"{text}: {exc}")

    sender = threading.Thread(target=traffic)
    sender.start()
    while len(acked) + len(failures) < 2 and sender.is_alive():
        time.sleep(0.2)
    testnet.kill(KILLED)
    assert testnet.state(KILLED)["ExitCode"] == 137  # SIGKILL: no drain, no goodbye
    time.sleep(3)  # traffic while the node is gone
    testnet.start(KILLED)
    testnet.wait_healthy([KILLED], timeout=120)
    sender.join(timeout=600)
    assert not sender.is_alive()
    # 4 of a mailbox's 5 replicas stay up, above the write quorum of 3: every send is acked.
    assert failures == [] and acked == texts
    got = _wait_received(testnet, "bob", set(texts))
    assert set(got) == set(texts), f"lost: {set(texts) - set(got)}"


def _query(testnet: Compose, promql: str) -> list[dict[str, Any]]:
    script = (
        "import json, sys, urllib.parse, urllib.request\n"
        "url = 'http://127.0.0.1:9090/api/v1/query?query=' + urllib.parse.quote(sys.argv[1])\n"
        "print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
    )
    answer = json.loads(testnet.exec("prometheus", "python3", "-c", script, promql))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _wait_query(testnet: Compose, promql: str, done: Any, timeout: float = 90) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(testnet, promql)
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(2)


# A STUN Binding request from a peer's container; prints the XOR-MAPPED-ADDRESS answered
# (RFC 8489 14.2: port and IPv4 address XORed with the magic cookie).
BINDING = """
import os, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
tid = os.urandom(12)
s.sendto(struct.pack("!HHI", 1, 0, 0x2112A442) + tid, (ADDRESS, 3478))
data = s.recv(2048)
assert data[:2] == b"\\x01\\x01" and data[8:20] == tid, data
at = 20
while at < len(data):
    kind, size = struct.unpack_from("!HH", data, at)
    if kind == 0x20:
        port = struct.unpack_from("!H", data, at + 6)[0] ^ 0x2112
        ip = struct.unpack_from("!I", data, at + 8)[0] ^ 0x2112A442
        print(socket.inet_ntoa(struct.pack("!I", ip)), port)
    at += 4 + (size + 3) // 4 * 4
"""


def test_the_relay_is_healthy_and_tells_a_peer_its_address_behind_the_nat(
    testnet: Compose,
) -> None:
    for relay in RELAYS:
        assert testnet.state(relay)["Health"]["Status"] == "healthy"
        address = relay_address(TESTNET, relay)
        for peer in TESTNET.peers:
            script = BINDING.replace("ADDRESS", repr(address))
            mapped = testnet.exec(peer.name, "python3", "-c", script, timeout=60).split()
            # What the relay sees is the peer's NAT router, not its LAN address.
            assert mapped[0] == peer_lan(TESTNET, peer.name).router_internet, mapped
            assert 0 < int(mapped[1]) < 65536


def test_prometheus_scrapes_every_node_and_sees_full_replica_sets(testnet: Compose) -> None:
    every = {f"{name}:7480" for name in NODES + RELAYS}
    up = _wait_query(testnet, "up == 1", lambda r: {s["metric"]["instance"] for s in r} == every)
    assert {s["metric"]["instance"] for s in up} == every
    # The replica-count histogram of the repair passes (every 10 s here): each storage node
    # exports it, and mailboxes held by all 5 of their replicas have been observed.
    counts = _query(testnet, "dna_storage_mailbox_replicas_count")
    assert {s["metric"]["instance"] for s in counts} == {f"{n}:7480" for n in STORAGE}
    full = _wait_query(
        testnet,
        'sum(dna_storage_mailbox_replicas_bucket{le="5.0"})'
        ' - sum(dna_storage_mailbox_replicas_bucket{le="4.0"}) > 0',
        bool,
    )
    assert full and float(full[0]["value"][1]) > 0, full
