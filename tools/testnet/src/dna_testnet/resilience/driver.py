"""What the resilience runner does to a network, behind one small interface
(`ClusterDriver`), so the same scenarios run on the compose testnet (`ComposeFaults`,
tested here) and on a Kubernetes cluster (`KubernetesFaults`, for deploy/chaos: NOT RUN
HERE, no API server can run on this project's machines).

Each is the harness's driver of its kind (`dna_testnet.harness`: it kills, wipes, starts,
restarts, pauses and resumes nodes, and waits for them to be healthy) plus what only the
resilience suite needs: network faults, the peers' agent and their deliveries.

Node names are the topology's (storage1, bootstrap2, alice, ...). Faults are undone by
their heal methods; `heal_all` undoes every network fault at once (a run that fails midway
calls it, so the next scenario starts on a whole network).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Protocol

from dna_testnet.compose import REDIS_ADDRESS, node_address, peer_lan
from dna_testnet.harness.containers import DOCKER, ComposeDriver, docker
from dna_testnet.harness.driver import Driver
from dna_testnet.harness.kubernetes import KubernetesDriver, Runner, run_kubectl
from dna_testnet.topology import TESTNET, Topology

AGENT = Path(__file__).with_name("agent.py")
Delivery = tuple[float, str]  # (when the recipient printed it, its text)


class ClusterDriver(Driver, Protocol):
    """A harness `Driver` (the node operations) plus the faults and probes a scenario needs."""

    def storage(self) -> list[str]: ...
    def node_of(self, ip: str) -> str:
        """The node name behind an address the overlay reports."""
        ...

    def wait_healthy(self, names: Sequence[str], timeout: float = 240) -> None: ...
    def partition(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        """Drop every packet between the two sides (nodes, and peers by their routers)."""
        ...

    def lose(self, peers: Sequence[str], nodes: Sequence[str], probability: float) -> None:
        """Drop each packet between ``peers`` and ``nodes`` with ``probability``."""
        ...

    def heal_all(self) -> None: ...
    def stop_peer(self, peer: str) -> None: ...
    def start_peer(self, peer: str) -> None: ...
    def agent(self, peer: str, *args: str) -> subprocess.Popen[str]:
        """The agent (agent.py) running in ``peer``'s container, stdout piped."""
        ...

    def deliveries(self, peer: str) -> list[Delivery]:
        """Every message the peer's `dna watch --json` printed, with its time."""
        ...


def run_agent(driver: ClusterDriver, peer: str, *args: str, timeout: float = 180) -> str:
    """The agent's whole output; an error naming what it said when it fails."""
    process = driver.agent(peer, *args)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"agent {' '.join(args)} in {peer} exited {process.returncode}: {err}")
    return out


def _fed(process: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """The agent's source written to the process's stdin, then closed (and forgotten, so
    `communicate` does not touch it again)."""
    assert process.stdin is not None
    process.stdin.write(AGENT.read_text())
    process.stdin.close()
    process.stdin = None
    return process


def _parse_log_line(line: str) -> Delivery | None:
    """``docker logs -t`` / ``kubectl logs --timestamps``: "<RFC 3339 time> <JSON>"."""
    stamp, _, rest = line.partition(" ")
    if not rest.startswith("{"):
        return None
    try:
        message = json.loads(rest)
    except json.JSONDecodeError:
        return None
    if "message_id" not in message or "text" not in message:
        return None
    # Nanoseconds: Python takes microseconds at most.
    head, _, frac = stamp.rstrip("Z").partition(".")
    when = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()
    return when, str(message["text"])


def parse_deliveries(log: str) -> list[Delivery]:
    return [d for line in log.splitlines() if (d := _parse_log_line(line)) is not None]


# --- compose --------------------------------------------------------------------------

CHAIN = "DNACHAOS"  # the iptables chain every fault rule goes in: a heal flushes it
# A container that shares a node's network namespace and may change its firewall (the
# nodes themselves run read-only, unprivileged, without iptables).
FIREWALL_IMAGE = "dna-router:local"


def _in_netns(holder: str, script: str) -> None:
    """Run shell ``script`` (stopping at the first failure) as root with NET_ADMIN in the
    network namespace of container ``holder``."""
    docker(
        "run", "--rm", "--net", f"container:{holder}", "--cap-add", "NET_ADMIN", "--user", "0",
        "--entrypoint", "sh", FIREWALL_IMAGE, "-ec", script,
    )  # fmt: skip


class ComposeFaults(ComposeDriver):
    """The compose testnet of project ``project`` (docker-compose.yml in ``root``): the
    harness's compose driver, plus iptables faults and the peers."""

    def __init__(self, project: str, root: Path, topology: Topology = TESTNET) -> None:
        super().__init__(project, os.environ, root, topology=topology)
        self.topology: Topology = topology
        self._firewalled: set[str] = set()  # names with rules in their chain

    def storage(self) -> list[str]:
        return [n.name for n in self.topology.storage]

    def addresses(self) -> dict[str, str]:
        """Every container on the internet network, by the name a fault uses: nodes,
        Redis, and each peer by its NAT router (what nodes see of it)."""
        found = {n.name: node_address(self.topology, n.name) for n in self.topology.nodes}
        found["redis"] = REDIS_ADDRESS
        for peer in self.topology.peers:
            found[peer.name] = peer_lan(self.topology, peer.name).router_internet
        return found

    def node_of(self, ip: str) -> str:
        for name, address in self.addresses().items():
            if address == ip:
                return name
        raise RuntimeError(f"no node of the testnet has the address {ip}")

    def _netns_holder(self, name: str) -> str:
        """The container whose network namespace carries ``name``'s internet traffic: a
        peer's router (the peer sits behind it), else the node itself."""
        peers = {p.name for p in self.topology.peers}
        return self.container(f"{name}-router" if name in peers else name)

    def _firewall(self, name: str, rules: Sequence[str]) -> None:
        """Run iptables ``rules`` (arguments after ``-A CHAIN``) in ``name``'s namespace."""
        self._firewalled.add(name)
        script = [
            f"iptables -N {CHAIN} 2>/dev/null || true",
            *(
                f"iptables -C {hook} -j {CHAIN} 2>/dev/null || iptables -I {hook} -j {CHAIN}"
                for hook in ("INPUT", "OUTPUT", "FORWARD")
            ),
            *(f"iptables -A {CHAIN} {rule}" for rule in rules),
        ]
        _in_netns(self._netns_holder(name), "\n".join(script))

    def _on_each(self, work: dict[str, list[str]]) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda item: self._firewall(*item), work.items()))

    def partition(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        ips = self.addresses()

        def cut(others: Sequence[str]) -> list[str]:
            return [f"{d} {ips[o]} -j DROP" for o in others for d in ("-s", "-d")]

        self._on_each({n: cut(side_b) for n in side_a} | {n: cut(side_a) for n in side_b})

    def lose(self, peers: Sequence[str], nodes: Sequence[str], probability: float) -> None:
        ips = self.addresses()
        rules = [
            f"{d} {ips[n]} -m statistic --mode random --probability {probability} -j DROP"
            for n in nodes
            for d in ("-s", "-d")
        ]
        self._on_each(dict.fromkeys(peers, rules))

    def heal_all(self) -> None:
        """Unpause every paused container; flush the fault rules of every container that
        got some (one `docker run` each: only those)."""
        names = list(self.addresses())
        holders = [self._netns_holder(name) for name in names]
        states = docker("inspect", "-f", "{{json .State.Paused}}", *holders).split()
        for holder, paused in zip(holders, states, strict=True):
            if json.loads(paused):
                docker("unpause", holder)
        flush = f"iptables -F {CHAIN} 2>/dev/null || true"
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda name: self._flush(name, flush), sorted(self._firewalled)))
        self._firewalled.clear()

    def _flush(self, name: str, flush: str) -> None:
        holder = self._netns_holder(name)
        if not json.loads(docker("inspect", "-f", "{{json .State.Running}}", holder)):
            return  # a stopped container has no namespace (and starts without the rules)
        _in_netns(holder, flush)

    def stop_peer(self, peer: str) -> None:
        self.stop(peer, timeout=10)

    def start_peer(self, peer: str) -> None:
        self.start(peer)

    def agent(self, peer: str, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [DOCKER, "exec", "-i", self.container(peer), "python3", "-", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return _fed(process)

    def deliveries(self, peer: str) -> list[Delivery]:
        done = subprocess.run(
            [DOCKER, "logs", "-t", self.container(peer)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return parse_deliveries(done.stdout)


# --- kubectl (deploy/chaos) ---------------------------------------------------------------

# The faults a pod cannot do to itself, as Chaos Mesh objects in deploy/chaos/chaos-mesh.
CHAOS_MANIFESTS = {
    "pause": "frozen-replica.yaml",
    "partition": "partition-halves.yaml",
    "loss": "loss-to-storage.yaml",
}


class KubernetesFaults(KubernetesDriver):
    """A cluster running the dna chart (release ``release`` in ``namespace``) and the two
    peer pods of deploy/chaos/peers.yaml: the harness's Kubernetes driver, plus the faults
    and the peers. Kubernetes has neither SIGSTOP nor iptables in the (unprivileged) pods:
    pause, partition and loss apply the Chaos Mesh objects of deploy/chaos/chaos-mesh,
    which `heal_all` deletes. NOT RUN HERE (no API server)."""

    def __init__(
        self,
        release: str,
        namespace: str,
        *,
        storage_count: int = 6,
        chaos_dir: Path = Path("deploy/chaos/chaos-mesh"),
        runner: Runner = run_kubectl,
    ) -> None:
        super().__init__(release, namespace, runner=runner)
        self.storage_count, self.chaos_dir = storage_count, chaos_dir
        self.applied: list[str] = []

    def storage(self) -> list[str]:
        return [f"storage{i + 1}" for i in range(self.storage_count)]

    def node_of(self, ip: str) -> str:
        pods = json.loads(self._run("get", "pods", "-o", "json"))["items"]
        for pod in pods:
            if pod.get("status", {}).get("podIP") == ip:
                name = str(pod["metadata"]["name"])
                return self.node_name(name) or name
        raise RuntimeError(f"no pod has the address {ip}")

    def _with_manifest(self, verb: str, text: str, *flags: str) -> None:
        """kubectl ``verb`` -f on ``text`` (written to a file: the runner has no stdin)."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as manifest:
            manifest.write(text)
            manifest.flush()
            self._run(verb, *flags, "-f", manifest.name)

    def _apply(self, manifest: str, replacements: dict[str, str]) -> None:
        text = (self.chaos_dir / manifest).read_text()
        for key, value in {
            "NAMESPACE": self.namespace,
            "RELEASE": self.release,
            **replacements,
        }.items():
            text = text.replace(key, value)
        self._with_manifest("apply", text)
        self.applied.append(text)

    def pause(self, name: str) -> None:
        """Chaos Mesh's frozen replica (the harness's driver cannot freeze a pod)."""
        self._apply(CHAOS_MANIFESTS["pause"], {"TARGET_POD": self.pod(name)})

    def resume(self, name: str) -> None:
        self.heal_all()

    def partition(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        self._apply(CHAOS_MANIFESTS["partition"], {})

    def lose(self, peers: Sequence[str], nodes: Sequence[str], probability: float) -> None:
        self._apply(CHAOS_MANIFESTS["loss"], {"LOSS_PERCENT": str(round(probability * 100))})

    def heal_all(self) -> None:
        for text in reversed(self.applied):
            self._with_manifest("delete", text, "--ignore-not-found")
        self.applied.clear()

    def stop_peer(self, peer: str) -> None:
        self._run("scale", "statefulset", f"chaos-{peer}", "--replicas=0")
        self._run("wait", "--for=delete", f"pod/chaos-{peer}-0", "--timeout=120s")

    def start_peer(self, peer: str) -> None:
        self._run("scale", "statefulset", f"chaos-{peer}", "--replicas=1")

    def agent(self, peer: str, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*self.kubectl, "-n", self.namespace, "exec", "-i", f"chaos-{peer}-0", "--",
             "python3", "-", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        return _fed(process)

    def deliveries(self, peer: str) -> list[Delivery]:
        return parse_deliveries(self._run("logs", "--timestamps", f"chaos-{peer}-0"))


def lines(process: subprocess.Popen[str]) -> Iterator[str]:
    assert process.stdout is not None
    yield from process.stdout


# --- the compose testnet's lifecycle ----------------------------------------------------


def compose_up(root: Path, project: str, topology: Topology = TESTNET) -> ComposeFaults:
    """docker-compose.yml up (no monitoring profile), from scratch, every node and peer
    healthy: the network a scenario starts on."""
    driver = ComposeFaults(project, root, topology)
    driver.run("down", "-v", "--remove-orphans", timeout=600)  # a crashed run's leftovers
    driver.run("up", "-d", timeout=600)
    driver.wait_healthy(
        [n.name for n in topology.nodes] + [p.name for p in topology.peers], timeout=600
    )
    return driver


def compose_down(root: Path, project: str) -> None:
    ComposeFaults(project, root).run("down", "-v", "--remove-orphans", timeout=300)
