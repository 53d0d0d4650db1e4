"""The in-memory network: stable per-pair latency, jitter that reorders, loss, crashes,
partitions, and a clock that only moves through the event heap."""

from __future__ import annotations

import random

from dna_core.overlay.codec import Datagram, Nodes
from dna_sim.network import Message, NetConfig, SimNetwork


def _net(size: int = 4, seed: int = 1, **config: float) -> tuple[SimNetwork, list[Message]]:
    net = SimNetwork(size, random.Random(seed), NetConfig(**config))
    received: list[Message] = []
    net.handlers = [received.append for _ in range(size)]
    return net, received


def _send(net: SimNetwork, src: int, dst: int, req_id: int) -> None:
    net.send(Message(src, dst, Datagram(req_id, Nodes(()))))


def _ids(messages: list[Message]) -> list[int]:
    return [m.datagram.request_id for m in messages]


def test_pair_base_is_stable_symmetric_and_in_range() -> None:
    net, _ = _net(size=50, base_latency=0.020, spread=0.5)
    bases = {net.pair_base(a, b) for a in range(50) for b in range(a + 1, 50)}
    assert all(0.010 <= base <= 0.030 for base in bases)
    assert len(bases) > 1000  # one base per pair, not one for all
    assert net.pair_base(3, 17) == net.pair_base(17, 3) == net.pair_base(3, 17)


def test_delivery_time_is_base_plus_bounded_jitter() -> None:
    net, received = _net(jitter=0.005)
    arrivals: list[float] = []
    handlers = [received.append for _ in range(4)]
    handlers[1] = lambda msg: arrivals.append(net.now)
    net.handlers = handlers
    for i in range(200):
        _send(net, 0, 1, i)
    net.run()
    base = net.pair_base(0, 1)
    assert len(arrivals) == 200
    assert all(base - 0.005 <= t <= base + 0.005 for t in arrivals)
    assert not received


def test_jitter_reorders_messages_sent_together() -> None:
    net, received = _net(jitter=0.005)
    for i in range(100):
        _send(net, 0, 1, i)
    net.run()
    order = _ids(received)
    assert sorted(order) == list(range(100))
    assert order != list(range(100))


def test_no_jitter_keeps_order() -> None:
    net, received = _net(jitter=0.0)
    for i in range(100):
        _send(net, 0, 1, i)
    net.run()
    assert _ids(received) == list(range(100))


def test_loss_drops_about_its_share() -> None:
    net, received = _net(loss=0.3)
    for i in range(2000):
        _send(net, 0, 1, i)
    net.run()
    assert net.sent == 2000
    assert net.dropped["loss"] + len(received) == 2000
    assert 500 < net.dropped["loss"] < 700


def test_crashed_node_receives_nothing() -> None:
    net, received = _net()
    net.crash([2])
    _send(net, 0, 2, 1)
    _send(net, 0, 1, 2)
    net.run()
    assert _ids(received) == [2]
    assert net.dropped["crashed"] == 1


def test_partition_drops_across_groups_until_healed() -> None:
    net, received = _net()
    net.partition([0, 0, 1, 1])
    _send(net, 0, 1, 1)  # same side
    _send(net, 0, 2, 2)  # across
    net.run()
    assert _ids(received) == [1]
    assert net.dropped["partition"] == 1
    assert not net.reachable(1, 3)
    net.heal()
    _send(net, 0, 2, 3)
    net.run()
    assert _ids(received) == [1, 3]


def test_clock_jumps_to_events_and_stops_at_until() -> None:
    net, _ = _net()
    seen: list[float] = []
    for when in (5.0, 1.0, 3.0):
        net.call_at(when, seen.append, when)
    net.run(until=3.0)
    assert seen == [1.0, 3.0]
    assert net.now == 3.0
    assert not net.idle
    net.run()
    assert seen == [1.0, 3.0, 5.0]
    assert net.idle


def test_same_seed_same_timeline() -> None:
    def timeline(seed: int) -> list[tuple[float, int]]:
        net, _ = _net(seed=seed, loss=0.1)
        out: list[tuple[float, int]] = []
        net.handlers = [lambda m: out.append((net.now, m.datagram.request_id)) for _ in range(4)]
        for i in range(300):
            _send(net, i % 4, (i + 1) % 4, i)
        net.run()
        return out

    assert timeline(5) == timeline(5)
    assert timeline(5) != timeline(6)
