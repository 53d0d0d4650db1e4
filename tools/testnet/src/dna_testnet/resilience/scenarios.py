"""The resilience scenarios, declared once: the compose suite (`dna-testnet resilience`,
`make resilience`) and deploy/chaos (kubectl, on a real cluster) both run these, and
deploy/chaos/scenarios.yaml is generated from them (`make chaos-scenarios`; a test checks it
is current).

Every scenario is the same experiment: alice sends ``messages`` messages to bob, one every
``interval_s``, while one fault runs on its timeline (seconds after the load starts); then
the fault is healed, the network settles, and the checker classifies every acknowledged
message. Lost and duplicated must be 0. Which nodes a fault hits is drawn from the seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

FaultKind = Literal["kill-wipe", "rolling-restart", "partition", "churn", "pause", "loss"]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    at_s: float  # after the load starts (or, with after_load, after it ended)
    after_load: bool = False  # wait for every write to complete (acked and drained) first
    lasts_s: float = 0.0  # partition, pause, loss: then healed; churn: for this long
    replicas: int = 0  # kill-wipe, pause: how many of the recipient mailbox's replicas
    fraction: float = 0.0  # churn: of the storage nodes down at once
    every_s: float = 0.0  # churn: down time + pause before the next set (after healthy)
    probability: float = 0.0  # loss: of each packet between peers and storage nodes


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    fault: Fault
    messages: int
    interval_s: float
    recipient_offline: bool = False  # bob is stopped during the load and the fault
    settle_s: float = 180.0  # after the heal: how long every acked message may take to arrive

    @property
    def load_s(self) -> float:
        return self.messages * self.interval_s

    def small(self, messages: int) -> Scenario:
        """The same scenario with fewer messages (the short suite in `make test`), spread
        over the fault's span when the fault runs during the load."""
        if self.fault.after_load:
            return replace(self, messages=messages)
        span = max(self.load_s / 4, self.fault.at_s + self.fault.lasts_s)
        return replace(self, messages=messages, interval_s=round(span / messages, 2))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "kill-wipe-replicas",
        "bob offline; alice sends; 4 of the 5 replicas of bob's mailbox are SIGKILLed, their"
        " volumes wiped (new node keys, no data) and started again; bob comes back and must"
        " get every acknowledged message from the one survivor and the repair",
        Fault("kill-wipe", at_s=0.0, after_load=True, replicas=4),
        messages=40,
        interval_s=0.25,
        recipient_offline=True,
    ),
    Scenario(
        "rolling-restart",
        "every storage node restarted in turn (docker restart, wait healthy, next) while"
        " alice sends and bob watches",
        Fault("rolling-restart", at_s=3.0),
        messages=150,
        interval_s=0.5,
    ),
    Scenario(
        "partition-halves",
        "the network cut 50/50 (alice, 1 bootstrap and 3 storage nodes against bob, 2"
        " bootstraps, 3 storage nodes and Redis; iptables DROP both ways) for 40 s, then"
        " healed; replicas converge and nothing bob deleted comes back",
        Fault("partition", at_s=10.0, lasts_s=40.0),
        messages=140,
        interval_s=0.5,
    ),
    Scenario(
        "churn",
        "30% of the storage nodes (2 of 6, drawn each time) SIGKILLed, started again 8 s"
        " later; 12 s after they are healthy, the next pair; for 80 s of the load",
        Fault("churn", at_s=3.0, lasts_s=80.0, fraction=0.3, every_s=20.0),
        messages=180,
        interval_s=0.5,
    ),
    Scenario(
        "frozen-replica",
        "one replica of bob's mailbox frozen (docker pause: it neither answers nor dies) for"
        " 20 s while alice sends and bob watches",
        Fault("pause", at_s=5.0, lasts_s=20.0, replicas=1),
        messages=80,
        interval_s=0.5,
    ),
    Scenario(
        "loss-to-storage",
        "20% of the packets between the peers (their NAT routers) and the storage nodes"
        " dropped (iptables statistic, both directions) for the whole load",
        Fault("loss", at_s=0.0, lasts_s=60.0, probability=0.2),
        messages=120,
        interval_s=0.5,
    ),
)

# The short suite in `make test`: the two scenarios with the node faults a cluster sees
# most (a replica lost with its disk, a replica hung), with small loads.
SHORT = ("kill-wipe-replicas", "frozen-replica")
SHORT_MESSAGES = 12


def by_name(name: str) -> Scenario:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    known = ", ".join(s.name for s in SCENARIOS)
    raise ValueError(f"no scenario {name!r} (known: {known})")


def as_yaml_data() -> dict[str, Any]:
    """The scenarios as deploy/chaos/scenarios.yaml holds them."""
    out = []
    for s in SCENARIOS:
        fault = {k: v for k, v in asdict(s.fault).items() if v or k in ("kind", "at_s")}
        out.append(
            {
                "name": s.name,
                "about": s.about,
                "messages": s.messages,
                "interval_s": s.interval_s,
                "recipient_offline": s.recipient_offline,
                "settle_s": s.settle_s,
                "fault": fault,
            }
        )
    return {"scenarios": out}
