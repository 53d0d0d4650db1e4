"""`dna-testnet`: a local DNA network of real processes on 127.0.0.x.

up       start 3 bootstrap and 6 storage nodes (state in --dir, default .dna-testnet)
status   one line per node: role, address, health, routing table, blobs
down     stop them (SIGTERM)
demo     up, the store-and-forward flow, down (in a temporary directory)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from dna_testnet.demo import run_demo
from dna_testnet.network import LocalNode, Testnet


def _stored_blobs(node: LocalNode) -> str:
    """A storage node's blob count from its metrics (updated each GC pass)."""
    if node.role != "storage":
        return "-"
    for line in node.http("/metrics").text.splitlines():
        if line.startswith("dna_storage_blobs "):
            return str(int(float(line.split()[1])))
    return "?"


def _status(net: Testnet) -> None:
    print(f"{'node':<12}{'role':<11}{'udp':<18}{'ready':<7}{'contacts':>9}{'records':>9}"
          f"{'blobs':>8}")  # fmt: skip
    for node in net.nodes:
        try:
            info = node.status()
            ready = "yes" if node.is_ready() else "no"
            line = (f"{ready:<7}{info['routing_table_size']:>9}{info['records']:>9}"
                    f"{_stored_blobs(node):>8}")  # fmt: skip
        except httpx.HTTPError:
            line = "down"
        print(f"{node.name:<12}{node.role:<11}{node.ip + ':7400':<18}{line}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="dna-testnet", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "status", "down", "demo"])
    parser.add_argument("--dir", type=Path, default=Path(".dna-testnet"))
    args = parser.parse_args()
    if args.command == "demo":
        run_demo()
        return
    net = Testnet(args.dir.resolve())
    try:
        if args.command == "up":
            net.up()
            _status(net)
        elif args.command == "status":
            _status(net)
        else:
            net.down()
    except RuntimeError as exc:
        print(f"dna-testnet: error: {exc}", file=sys.stderr)
        sys.exit(1)
