"""One resilience scenario on a running network, through a `ClusterDriver`:

1. look up bob's mailbox replicas (the agent in alice's container asks the overlay);
2. alice's agent sends the load, one JSON line per invoke / ack / fail;
3. meanwhile the fault runs on its timeline, every step logged with its time;
4. bob's deliveries are read every READ_EVERY_S (his `dna watch --json` log): each read
   is everything he has received by then;
5. after the heal, reads go on until every acked message arrived or ``settle_s`` passed;
   then the storage nodes are asked what of bob's mailbox they still serve: bob deleted
   what he received, and no node may serve it once the replicas converged;
6. the checker classifies the history; the figures and the fault timeline are printed.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dna_testnet.resilience.checker import Read, Send, Verdict, check, check_deleted
from dna_testnet.resilience.driver import ClusterDriver, lines, run_agent
from dna_testnet.resilience.scenarios import Fault, Scenario

SENDER, RECIPIENT = "alice", "bob"
READ_EVERY_S = 2.0
CONVERGE_S = 90.0  # after delivery: how long the replicas may take to drop what bob deleted
CHURN_DOWN_S = 8.0  # how long a churned node stays down


@dataclass
class Timeline:
    start: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, text: str) -> None:
        with self._lock:
            self.events.append((time.time(), text))
        print(f"  [{time.time() - self.start:6.1f} s] {text}", flush=True)

    def lines(self) -> list[str]:
        return [f"{t - self.start:6.1f} s  {text}" for t, text in self.events]


@dataclass
class Outcome:
    scenario: str
    seed: int
    verdict: Verdict
    undeleted: list[str]
    fetch_duplicates: list[str]
    duration_s: float
    timeline: list[str]
    failures: list[str] = field(default_factory=list)  # "ID: why" of each failed send

    @property
    def passed(self) -> bool:
        return self.verdict.valid and not self.undeleted and not self.fetch_duplicates

    def figures(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            **self.verdict.figures(),
            "undeleted": len(self.undeleted),
            "fetch_duplicates": len(self.fetch_duplicates),
            "duration_s": round(self.duration_s, 1),
            "passed": self.passed,
        }


class Load:
    """Alice's agent sending in the background; the history it printed."""

    def __init__(self, driver: ClusterDriver, scenario: Scenario, prefix: str) -> None:
        self.process = driver.agent(
            SENDER, "send", RECIPIENT, prefix, str(scenario.messages), str(scenario.interval_s)
        )
        self.records: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        for line in lines(self.process):
            if line.startswith("{"):
                self.records.append(json.loads(line))

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.process.wait(timeout=30)
        if self.process.returncode != 0:
            assert self.process.stderr is not None
            raise RuntimeError(
                f"the load ended with {self.process.returncode}: "
                f"{self.process.stderr.read()[-2000:]}"
            )

    def sends(self) -> list[Send]:
        invoked = {r["id"]: r["t"] for r in self.records if r["op"] == "invoke"}
        ended = {r["id"]: r for r in self.records if r["op"] in ("ack", "fail")}
        return [
            Send(i, t, ended[i]["op"], ended[i]["t"]) if i in ended else Send(i, t, "pending")
            for i, t in invoked.items()
        ]

    def failures(self) -> list[str]:
        return [f"{r['id']}: {r['error']}" for r in self.records if r["op"] == "fail"]

    def message_ids(self) -> dict[str, str]:
        """message ID (hex) -> send ID, for the acked sends."""
        return {r["message_id"]: r["id"] for r in self.records if r["op"] == "ack"}


def run_scenario(driver: ClusterDriver, scenario: Scenario, seed: int) -> Outcome:
    rng = random.Random(seed)
    timeline = Timeline()
    prefix = f"{scenario.name}-{seed}-{int(time.time())}"
    print(f"scenario {scenario.name} (seed {seed}): {scenario.about}", flush=True)
    replicas = _replicas(driver)
    timeline.log(f"bob's mailbox replicas: {', '.join(replicas[:5])}")
    reads: list[Read] = []
    try:
        if scenario.recipient_offline:
            driver.stop_peer(RECIPIENT)
            timeline.log("bob stopped")
        load = Load(driver, scenario, prefix)
        timeline.log(
            f"load started: {scenario.messages} messages, one every {scenario.interval_s} s"
        )
        reader = _Reader(driver, prefix, reads, enabled=not scenario.recipient_offline)
        _run_fault(driver, scenario.fault, rng, replicas, timeline, load, scenario)
        load.wait(timeout=scenario.load_s + 600)
        timeline.log("load done")
    finally:
        driver.heal_all()
    if scenario.recipient_offline:
        driver.start_peer(RECIPIENT)
        timeline.log("bob started")
        reader = _Reader(driver, prefix, reads, enabled=True)
    acked = {s.id for s in load.sends() if s.outcome == "ack"}
    reader.until(lambda ids: acked <= ids, scenario.settle_s)
    reader.stop()
    timeline.log("reads done")
    undeleted, fetch_dups = _converged(driver, load, reads, timeline)
    verdict = check(load.sends(), reads)
    duration = time.time() - timeline.start
    return Outcome(
        scenario.name,
        seed,
        verdict,
        undeleted,
        fetch_dups,
        duration,
        timeline.lines(),
        load.failures(),
    )


def _replicas(driver: ClusterDriver) -> list[str]:
    found = json.loads(run_agent(driver, SENDER, "replicas", RECIPIENT))["replicas"]
    return [driver.node_of(r["ip"]) for r in found]


class _Reader:
    """Bob's deliveries every READ_EVERY_S, as reads (what he has by then)."""

    def __init__(self, driver: ClusterDriver, prefix: str, reads: list[Read], *, enabled: bool):
        self.driver, self.prefix, self.reads = driver, prefix, reads
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if enabled:
            self.thread.start()

    def read(self) -> Read:
        delivered = self.driver.deliveries(RECIPIENT)
        read = Read(
            time.time(), tuple(text for _, text in delivered if text.startswith(self.prefix))
        )
        self.reads.append(read)
        return read

    def _loop(self) -> None:
        while not self._stop.wait(READ_EVERY_S):
            self.read()

    def until(self, done: Callable[[set[str]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(set(self.read().ids)) and time.monotonic() < deadline:
            time.sleep(READ_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.read()  # the last read, after everything


def _converged(
    driver: ClusterDriver, load: Load, reads: list[Read], timeline: Timeline
) -> tuple[list[str], list[str]]:
    """(deleted messages still served, messages a node serves twice) once the replicas
    converged, or what is left of them after CONVERGE_S."""
    by_message = load.message_ids()
    delivered = set(reads[-1].ids) if reads else set()
    deadline = time.monotonic() + CONVERGE_S
    while True:
        nodes = json.loads(run_agent(driver, RECIPIENT, "holdings"))["nodes"]
        holdings = {
            driver.node_of(ip): [by_message.get(m, m) for m in ids or []]
            for ip, ids in nodes.items()
        }
        undeleted = check_deleted(delivered, holdings)
        twice = sorted(
            f"{i}@{node}"
            for node, ids in holdings.items()
            for i, n in Counter(ids).items()
            if n > 1 and i in by_message.values()
        )
        if (not undeleted and not twice) or time.monotonic() > deadline:
            timeline.log(
                f"holdings: {sum(map(len, holdings.values()))} blobs of bob's on"
                f" {len(holdings)} nodes; {len(undeleted)} deleted still served"
            )
            return undeleted, twice
        time.sleep(5)


# --- faults ---------------------------------------------------------------------------


def _run_fault(
    driver: ClusterDriver,
    fault: Fault,
    rng: random.Random,
    replicas: list[str],
    timeline: Timeline,
    load: Load,
    scenario: Scenario,
) -> None:
    if fault.after_load:
        load.wait(timeout=scenario.load_s + 600)
        timeline.log("load done (every write acked or failed, and drained)")
    time.sleep(fault.at_s)
    storage = driver.storage()
    match fault.kind:
        case "kill-wipe":
            _kill_wipe(driver, rng.sample(replicas[:5], fault.replicas), timeline)
        case "rolling-restart":
            for node in storage:
                timeline.log(f"restart {node}")
                driver.restart(node)
                driver.wait_healthy([node])
                timeline.log(f"{node} healthy")
        case "partition":
            _partition(driver, storage, rng, fault, timeline)
        case "churn":
            _churn(driver, storage, rng, fault, timeline)
        case "pause":
            (node,) = rng.sample(replicas[:5], 1)
            driver.pause(node)
            timeline.log(f"pause {node}")
            time.sleep(fault.lasts_s)
            driver.resume(node)
            timeline.log(f"unpause {node}")
        case "loss":
            driver.lose([SENDER, RECIPIENT], storage, fault.probability)
            timeline.log(f"{fault.probability:.0%} loss between alice, bob and every storage node")
            time.sleep(fault.lasts_s)
            driver.heal_all()
            timeline.log("loss healed")


def _kill_wipe(driver: ClusterDriver, victims: list[str], timeline: Timeline) -> None:
    for node in victims:
        driver.kill(node)
        timeline.log(f"kill -9 {node}")
    for node in victims:
        driver.wipe(node)
        timeline.log(f"wipe {node}")
    for node in victims:
        driver.start(node)
    driver.wait_healthy(victims)
    timeline.log(f"{', '.join(victims)} back, empty, healthy")


def _partition(
    driver: ClusterDriver, storage: list[str], rng: random.Random, fault: Fault, timeline: Timeline
) -> None:
    """Alice's half and bob's half, each with half the storage nodes (drawn from the
    seed) and bootstrap nodes; Redis goes with the nodes that use it (the last two)."""
    shuffled = storage[:-2]
    rng.shuffle(shuffled)
    half = len(storage) // 2
    side_a = ["bootstrap1", *shuffled[:half], SENDER]
    side_b = ["bootstrap2", "bootstrap3", *shuffled[half:], *storage[-2:], "redis", RECIPIENT]
    driver.partition(side_a, side_b)
    timeline.log(f"partition: {' '.join(side_a)} | {' '.join(side_b)}")
    time.sleep(fault.lasts_s)
    driver.heal_all()
    timeline.log("partition healed")


def _churn(
    driver: ClusterDriver, storage: list[str], rng: random.Random, fault: Fault, timeline: Timeline
) -> None:
    count = max(1, round(len(storage) * fault.fraction))
    end = time.monotonic() + fault.lasts_s
    while time.monotonic() < end:
        victims = rng.sample(storage, count)
        for node in victims:
            driver.kill(node)
        timeline.log(f"churn: kill -9 {', '.join(victims)}")
        time.sleep(CHURN_DOWN_S)
        for node in victims:
            driver.start(node)
        driver.wait_healthy(victims)
        timeline.log(f"churn: {', '.join(victims)} healthy again")
        time.sleep(max(0.0, fault.every_s - CHURN_DOWN_S))


def report(outcome: Outcome) -> str:
    f = outcome.figures()
    head = (
        f"scenario {f['scenario']} seed {f['seed']}: acked {f['acked']}, present"
        f" {f['present']}, lost {f['lost']}, duplicates {f['duplicates']}, failed"
        f" {f['failed']} (recovered {f['recovered']}), never read {f['never_read']},"
        f" stale {f['stale']} (worst"
        f" {f['worst_stale_s']} s), deleted still served {f['undeleted']}, duration"
        f" {f['duration_s']} s: {'PASS' if outcome.passed else 'FAIL'}"
    )
    details = [f"  failed: {error}" for error in outcome.failures[:5]]
    if outcome.verdict.lost:
        details.append(f"  lost: {', '.join(outcome.verdict.lost)}")
    if outcome.verdict.duplicates:
        details.append(f"  duplicates: {outcome.verdict.duplicates}")
    if outcome.undeleted or outcome.fetch_duplicates:
        details.append(f"  still served: {outcome.undeleted} twice: {outcome.fetch_duplicates}")
    return "\n".join(
        [head, *details, "  fault timeline:", *(f"    {line}" for line in outcome.timeline)]
    )
