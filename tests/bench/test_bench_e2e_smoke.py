"""Smoke run of the end-to-end benchmark: a tiny run on its own addresses, output format only.

The testnet goes on addresses from the harness's allocator (the bench process's own block
of 127.0.0.0/8, skipping anything in use), so a benchmark run and the suite can share the
machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # every test runs a benchmark as a process

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}
SENDERS = 3
LATENCIES = {f"e2e.{m}.{p}" for m in ("rt", "seq", f"c{SENDERS}") for p in ("p50", "p99")}
SEND_LATENCIES = {f"e2e.send.{m}.{p}" for m in ("seq", f"c{SENDERS}") for p in ("p50", "p99")}
THROUGHPUTS = {"e2e.seq", f"e2e.c{SENDERS}"}
SEND_THROUGHPUTS = {"e2e.send.seq", f"e2e.send.c{SENDERS}"}
CPU = {"e2e.seq.cpu", f"e2e.c{SENDERS}.cpu"}
FLOORS = {"e2e.rt.floor", "e2e.seq.floor"}
DIRECT = {"e2e.direct.rt.p50", "e2e.direct.rt.p99"}  # issue 14: the direct path
BASELINES = ["opendht-signed", "opendht"]  # putEncrypted -> listen first: the goals' judge
GOALS = {
    (f"e2e.{m}.{p}", b) for m in ("rt", "seq", f"c{SENDERS}") for p in ("p50", "p99")
    for b in BASELINES
} | {(name, "opendht") for name in CPU} | {(name, "opendht-signed") for name in DIRECT}  # fmt: skip


def test_e2e_bench_quick_prints_figures_beside_opendht_and_cleans_up() -> None:
    """9 node processes and a TURN relay, a recipient process, 3 senders, OpenDHT's
    authenticated and unsigned listen paths beside them (~40 s): every figure (the direct
    path's beside store-and-forward too), the CPU and floor lines, a goal line per goal."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--quick", "--senders", str(SENDERS),
         "--budget", "180"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert "machine" in lines[0]
    assert "elapsed_s" in lines[-1]["detail"], lines[-1]  # ran to the end
    figures = {line["bench"]: line for line in lines if "bench" in line}
    assert (
        set(figures)
        == LATENCIES | SEND_LATENCIES | THROUGHPUTS | SEND_THROUGHPUTS | CPU | FLOORS | DIRECT
    )
    for name, figure in figures.items():
        assert set(figure) == KEYS, figure
        assert figure["ours"] > 0, figure
        assert figure["params"]["failures"]["ours"] == 0, figure  # every message arrived
        if name in SEND_THROUGHPUTS:  # OpenDHT's put has no throughput of its own here
            assert figure["baseline"] == {} and figure["ratio"] is None, figure
            continue
        expected = ["floor"] if name in FLOORS else BASELINES
        if name in DIRECT:  # every message took the direct path (a fallback is a failure)
            expected = [*BASELINES, "store-and-forward"]
            assert figure["params"]["path"].startswith("direct, TURN-relayed"), figure
        assert list(figure["baseline"]) == expected, figure
        assert all(v > 0 for v in figure["baseline"].values()) and figure["ratio"] > 0, figure
    goals = [line["goal"] for line in lines if "goal" in line]
    assert {(g["bench"], g["baseline"]) for g in goals} == GOALS
    assert all(g["status"] in ("PASS", "MISS") and g["ratio"] > 0 for g in goals), goals
    setup = next(line["detail"]["setup"] for line in lines if "setup" in line.get("detail", {}))
    # 9 addresses of the bench's own from the allocator, none of dna-testnet's 127.0.0.x
    ips = setup["ips"]
    assert len(set(ips)) == 9 and all(ip.startswith("127.") for ip in ips), ips
    assert not any(ip.startswith("127.0.0.") for ip in ips), ips
    assert setup["direct"]["ice_pair"] == "relay->relay", setup["direct"]
    for pid in [*setup["node_pids"], setup["recipient_pid"], setup["relay_pid"]]:  # all stopped
        assert not _running(pid), pid


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left unreaped counts as stopped)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
