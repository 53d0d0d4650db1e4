"""`dna watch` rides out a network restart (issue 11, item 1): the real `dna` CLI against a
real testnet (1 bootstrap + 3 storage processes) that is stopped and
started again while it watches."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster import free_ips, sample_value, scrape
from dna_testnet.network import Testnet
from support import dna_watch, lines, run_script, until, wait_for

pytestmark = pytest.mark.process  # every test runs the dna command

PASS = {"DNA_PASSPHRASE": "correct horse"}


def dna(home: Path, net: Testnet, *args: str) -> dict:  # type: ignore[type-arg]
    seeds = ",".join(f"{h}:{p}" for h, p in net.seeds)
    out = run_script("dna", "--home", str(home), "--bootstrap", seeds, "--json", *args, env=PASS)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_watch_rides_out_a_network_restart(tmp_path: Path) -> None:
    net = Testnet(tmp_path / "net", bootstraps=1, storage=3, addresses=free_ips(4))
    net.up()
    watcher = None
    try:
        suffix = str(time.time_ns())[-6:]
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        dna(alice, net, "identity", "create", "--name", f"alice{suffix}")
        dna(bob, net, "identity", "create", "--name", f"bob{suffix}")
        dna(bob, net, "contacts", "add", f"alice{suffix}")
        watcher = dna_watch(alice, net.seeds, PASS, stderr=subprocess.PIPE)
        assert watcher.stdout is not None and watcher.stderr is not None
        out, err = lines(watcher.stdout), lines(watcher.stderr)
        seen: list[str] = []
        dna(bob, net, "send", f"alice{suffix}", "before")
        assert json.loads(wait_for(out, "before", 20, seen))["text"] == "before"

        net.down()  # every node stops, as `dna-testnet down` does
        wait_for(err, "network unreachable", 30, seen)
        net.up()  # same keys, same data
        wait_for(err, "network back", 40, seen)
        dna(bob, net, "send", f"alice{suffix}", "after")
        assert json.loads(wait_for(out, "after", 20, seen))["text"] == "after"
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)
            try:
                assert watcher.wait(10) == 0  # Ctrl-C ends it cleanly
            finally:
                watcher.kill()
        net.down()


def requests(net: Testnet, method: str, outcomes: tuple[str, ...] = ("ok", "refused")) -> float:
    """Requests of ``method`` the storage nodes served or refused, unary or on a session."""
    return sum(
        sample_value(scrape(node), "dna_storage_requests_total", method=method, outcome=outcome)
        for node in net.nodes
        if node.role == "storage"
        for outcome in outcomes
    )


def subscriptions(net: Testnet) -> float:
    """Mailbox subscriptions live on the storage nodes."""
    return sum(
        sample_value(scrape(node), "dna_storage_subscriptions")
        for node in net.nodes
        if node.role == "storage"
    )


def test_watch_receives_pushed_messages_without_fetching(tmp_path: Path) -> None:
    net = Testnet(tmp_path / "net", bootstraps=1, storage=3, first=150)
    net.up()
    watcher = None
    try:
        suffix = str(time.time_ns())[-6:]
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        dna(alice, net, "identity", "create", "--name", f"alice{suffix}")
        dna(bob, net, "identity", "create", "--name", f"bob{suffix}")
        dna(bob, net, "contacts", "add", f"alice{suffix}")
        watcher = dna_watch(alice, net.seeds, PASS, stderr=subprocess.PIPE)
        assert watcher.stdout is not None and watcher.stderr is not None
        seen: list[str] = []
        out = lines(watcher.stdout)
        lines(watcher.stderr)  # drained: a full pipe would block the watch
        dna(bob, net, "send", f"alice{suffix}", "first")
        wait_for(out, "first", 20, seen)
        # subscribed on every replica (it subscribes after its sync: no fetch after this)
        until(lambda: subscriptions(net) == 3, "the watch subscribed on the 3 storage nodes")
        before, deletes = requests(net, "fetch"), requests(net, "delete", ("ok",))
        dna(bob, net, "send", f"alice{suffix}", "pushed")
        assert json.loads(wait_for(out, "pushed", 20, seen))["text"] == "pushed"
        assert requests(net, "fetch") == before  # bob's send fetches nothing; the watch neither
        # The round's settling, in the background, deletes the pushed blob from the replicas.
        until(lambda: requests(net, "delete", ("ok",)) > deletes, "the pushed blob deleted")
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)
            try:
                assert watcher.wait(10) == 0
            finally:
                watcher.kill()
        net.down()
