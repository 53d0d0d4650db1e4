"""The node harness (dna_testnet.harness): the address allocator, the local driver on real
processes, the Kubernetes driver's kubectl commands, and the rule that no test or bench
picks a loopback address by hand."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
from dna_testnet.harness import (
    LOOPBACK,
    AddressesExhaustedError,
    Cluster,
    Driver,
    LocalDriver,
    LoopbackAllocator,
    NodeAddress,
    NotReadyError,
    local_cluster,
)
from dna_testnet.harness.containers import ComposeDriver
from dna_testnet.harness.kubernetes import KubernetesDriver, UnsupportedError
from dna_testnet.topology import UDP_PORT, NodeSpec, Topology, make_topology

ROOT = Path(__file__).resolve().parents[2]


# --- the allocator -------------------------------------------------------------------------


def test_the_allocator_hands_out_each_address_once_skipping_host_bytes_0_and_255() -> None:
    allocator = LoopbackAllocator("127.9.0.253", probe=False)
    assert allocator.take(4) == ["127.9.0.253", "127.9.0.254", "127.9.1.1", "127.9.1.2"]
    assert allocator.one() == "127.9.1.3"
    assert allocator.take(0) == []


def test_the_allocator_skips_an_address_something_listens_on() -> None:
    allocator = LoopbackAllocator("127.9.2.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.9.2.1", UDP_PORT))  # a node of another run on the first address
        assert allocator.take(2) == ["127.9.2.2", "127.9.2.3"]


def test_the_allocator_says_when_its_range_is_used_up() -> None:
    allocator = LoopbackAllocator("127.9.3.1", "127.9.3.2", probe=False)
    assert allocator.take(2) == ["127.9.3.1", "127.9.3.2"]
    with pytest.raises(AddressesExhaustedError, match=r"127\.9\.3\.1-127\.9\.3\.2"):
        allocator.one()


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        ("10.0.0.1", "127.0.0.9", "10.0.0.1 is not a loopback address"),
        ("127.0.0.9", "127.0.0.2", "first address 127.0.0.9 is after last address 127.0.0.2"),
    ],
)
def test_a_bad_range_is_refused(first: str, last: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        LoopbackAllocator(first, last)


def test_a_negative_count_is_refused_and_takes_nothing() -> None:
    allocator = LoopbackAllocator("127.9.4.1", probe=False)
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        allocator.take(-1)
    assert allocator.one() == "127.9.4.1"


def test_the_process_allocator_stays_off_dna_testnets_fixed_addresses() -> None:
    assert not LOOPBACK.one().startswith("127.0.0.")


# Literal loopback addresses other than 127.0.0.1 (which is "this machine", not a pick) and
# the network 127.0.0.0/8: "127.0.0.5", f"127.0.0.{first}" and the like.
HAND_PICKED = re.compile(r"127\.0\.0\.(?!1(?!\d)|0/)(\d|\{)")
# Unit tests of pure functions, where an address is example data that nothing binds.
EXAMPLES = {
    "tests/integration/test_bootstrap_names.py": "local_host_for and resolve_seeds inputs",
    "tests/core/overlay/test_channel_pool.py": "a channel target never dialled",
    "tests/core/test_mailbox_replica_cache.py": "contacts in a cache, never dialled",
    "tests/peer/test_dna_cli.py": "a bootstrap address nothing listens on, and a bad port",
    "tests/peer/test_dna_cli_names.py": "a bootstrap address nothing listens on",
    "tests/testnet/test_harness.py": "this rule's own pattern and allocator ranges",
    "tests/stun/test_core.py": "relay policy inputs, never dialled",
    "tests/core/test_mailbox_planner.py": "contacts in a plan, never dialled",
    "tests/storage/test_mailbox_replica_spread.py": "contacts in a replica choice, never dialled",
}


def test_no_test_or_bench_picks_a_loopback_address_by_hand() -> None:
    offenders = []
    for path in sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative in EXAMPLES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HAND_PICKED.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == [], (
        "take node and source addresses from the harness (cluster.free_ips, "
        "dna_testnet.harness.LOOPBACK):\n" + "\n".join(offenders)
    )


def test_the_rule_catches_a_hand_picked_address_and_lets_localhost_be() -> None:
    assert HAND_PICKED.search('IP = "127.0.0.71"')
    assert HAND_PICKED.search('seed = f"127.0.0.{FIRST_IP}:7400"')
    assert HAND_PICKED.search('"127.0.0.10"')
    assert not HAND_PICKED.search('host = "127.0.0.1"')
    assert not HAND_PICKED.search('("127.0.0.1", 0)')
    assert not HAND_PICKED.search("all of 127.0.0.0/8")


# --- the drivers ---------------------------------------------------------------------------


def test_every_driver_is_a_driver() -> None:
    local = local_cluster(Path("/nonexistent"), make_topology(1, 1), allocator=_fixed())
    assert isinstance(local.driver, Driver)
    assert isinstance(ComposeDriver("p", {}, ROOT), Driver)
    assert isinstance(KubernetesDriver("r", "ns"), Driver)


def _fixed() -> LoopbackAllocator:
    return LoopbackAllocator("127.9.5.1", probe=False)


def test_a_local_cluster_puts_nodes_on_its_addresses_and_seeds_from_its_bootstraps() -> None:
    cluster = local_cluster(Path("/r"), make_topology(2, 2), allocator=_fixed())
    assert [cluster.address(n).host for n in cluster.names] == [
        "127.9.5.1", "127.9.5.2", "127.9.5.3", "127.9.5.4"
    ]  # fmt: skip
    assert cluster.seeds == [("127.9.5.1", UDP_PORT), ("127.9.5.2", UDP_PORT)]
    nodes = cluster.driver.nodes
    assert {n.bootstraps == ["127.9.5.1:7400", "127.9.5.2:7400"] for n in nodes} == {True}
    assert [n.command for n in nodes] == ["dna-bootstrap"] * 2 + ["dna-storage-node"] * 2


def test_a_local_cluster_refuses_unknown_seeds_and_a_wrong_address_count() -> None:
    topology = make_topology(1, 1)
    with pytest.raises(ValueError, match=r"seeds \['nobody'\] are not nodes"):
        local_cluster(Path("/r"), topology, seeds=["nobody"], allocator=_fixed())
    with pytest.raises(ValueError, match="2 nodes need as many addresses, got 1"):
        local_cluster(Path("/r"), topology, addresses=["127.9.6.1"])
    with pytest.raises(KeyError, match="no node 'nobody'"):
        local_cluster(Path("/r"), topology, allocator=_fixed()).driver.node("nobody")


@pytest.mark.process
def test_the_local_driver_pauses_resumes_stops_wipes_and_kills_a_real_node(
    tmp_path: Path,
) -> None:
    cluster = local_cluster(tmp_path, Topology((NodeSpec("solo", "storage"),)), seeds=[])
    driver: LocalDriver = cluster.driver
    node = driver.node("solo")
    with cluster.running(timeout=60):
        first_id = node.status()["node_id"]
        driver.pause("solo")
        assert driver.is_running("solo") and not driver.is_ready("solo")  # frozen, not gone
        driver.resume("solo")
        cluster.wait_ready(["solo"], timeout=30)
        with pytest.raises(RuntimeError, match="solo is running: stop or kill it"):
            driver.wipe("solo")
        driver.stop("solo")
        assert not driver.is_running("solo")
        assert Path(node.disk.key_file).exists() and Path(node.disk.data_dir).is_dir()
        driver.wipe("solo")
        assert not Path(node.disk.key_file).exists() and not Path(node.disk.data_dir).exists()
        cluster.start(["solo"], timeout=60)
        assert node.status()["node_id"] != first_id  # a new disk: a new node
        assert node.proc is not None
        proc = node.proc
        driver.kill("solo")
        assert proc.returncode == -signal.SIGKILL
        driver.restart("solo")
        cluster.wait_ready(["solo"], timeout=60)
    assert not driver.is_running("solo")  # `running` killed it at the end
    # one log across restarts: the first start and the one after the wipe each minted a key
    assert driver.logs("solo").count("minted a new node key") == 2


@pytest.mark.process
def test_waiting_for_a_node_that_exits_fails_at_once_with_its_log(tmp_path: Path) -> None:
    cluster = local_cluster(
        tmp_path, Topology((NodeSpec("broken", "storage"),)), seeds=[], storage_toml="nonsense"
    )
    with pytest.raises(NotReadyError, match="broken exited"):
        cluster.start(timeout=60)


class Recorder:
    """Stands in for kubectl (no Kubernetes API server runs here): records each command
    and answers with the next canned output."""

    def __init__(self, *answers: str) -> None:
        self.commands: list[list[str]] = []
        self.answers = list(answers)

    def __call__(self, argv: Sequence[str]) -> str:
        self.commands.append(list(argv))
        return self.answers.pop(0) if self.answers else ""


def test_the_kubernetes_driver_runs_these_kubectl_commands() -> None:
    kubectl = Recorder()
    driver = KubernetesDriver("t", "dna", runner=kubectl)
    driver.kill("storage3")
    driver.stop("bootstrap1", timeout=20)
    driver.wipe("storage1")
    driver.start("storage1")
    driver.logs("storage2")
    k = ["kubectl", "-n", "dna"]
    assert kubectl.commands == [
        [*k, "delete", "pod", "t-dna-storage-2", "--grace-period=0", "--force"],
        [*k, "delete", "pod", "t-dna-bootstrap-0", "--grace-period=20", "--wait"],
        [*k, "delete", "pvc", "data-t-dna-storage-0", "--wait=false"],
        [*k, "delete", "pod", "t-dna-storage-0", "--grace-period=0", "--force"],
        [*k, "wait", "--for=condition=Ready", "pod/t-dna-storage-0", "--timeout=600s"],
        [*k, "logs", "t-dna-storage-1"],
    ]


def test_the_kubernetes_driver_reads_readiness_and_names_pods_as_the_chart_does() -> None:
    kubectl = Recorder("True", "False", "Running")
    driver = KubernetesDriver("my-dna", "prod", runner=kubectl)
    assert driver.is_ready("storage1") and not driver.is_ready("storage2")
    assert driver.is_running("bootstrap2")
    assert kubectl.commands[2][-3:] == ["my-dna-bootstrap-1", "-o", "jsonpath={.status.phase}"]
    assert driver.address("storage4") == NodeAddress(
        "my-dna-storage-3.my-dna-storage-hl.prod.svc.cluster.local"
    )
    with pytest.raises(ValueError, match="'storage0' is not a topology node name"):
        driver.pod("storage0")
    with pytest.raises(UnsupportedError, match=r"frozen-replica\.yaml"):
        driver.pause("storage1")


def test_a_cluster_names_its_roles_and_refuses_an_unknown_node() -> None:
    cluster = Cluster(make_topology(1, 2), KubernetesDriver("t", "dna", runner=Recorder()))
    assert (cluster.bootstraps, cluster.storage) == (["bootstrap1"], ["storage1", "storage2"])
    with pytest.raises(KeyError, match="no node 'storage9'"):
        cluster.spec("storage9")
