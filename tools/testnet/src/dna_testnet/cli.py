"""`dna-testnet`: a local DNA network of real processes on 127.0.0.x.

up       start 3 bootstrap and 6 storage nodes and a STUN/TURN relay (state in --dir,
         default .dna-testnet); again, it starts only the nodes not running (after a
         crash or a kill), with their keys and data; one that cannot start stops
         those this `up` started and says why
status   one line per node: role, address, PID, health, routing table, records, blobs
         (of --dir's testnet: exit 1 if none ever started there)
down     stop every node of --dir (also ones restarted by hand), saying which
         (exit 1 if no testnet ever started there)
demo     up, the store-and-forward flow, down (in a temporary directory)
resilience  the resilience scenarios on the compose testnet (docs/resilience.md): each
         prints its seed and figures; exit 1 if any message was lost or duplicated
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from dna_core.hostport import host_port
from dna_peer.terminal import console, quiet_broken_pipe, table

from dna_testnet.demo import run_demo
from dna_testnet.network import LocalNode, NoTestnetError, Testnet
from dna_testnet.resilience.suite import add_arguments, run_suite
from dna_testnet.topology import TESTNET

EXAMPLES = """examples:
  dna-testnet up                 start the network (about 5 s)
  dna-testnet status --json      one JSON object per node, for scripts
  dna-testnet down               stop it
  dna-testnet up --dir /tmp/net  a second state directory (same addresses: one at a time)
  dna-testnet resilience --scenario frozen-replica --seed 7   one scenario, on containers
"""


def _stored_blobs(node: LocalNode) -> int | None:
    """A storage node's blob count from its metrics (updated each GC pass)."""
    for line in node.http("/metrics").text.splitlines():
        if line.startswith("dna_storage_blobs "):
            return int(float(line.split()[1]))
    return None


def _node_row(node: LocalNode, pid: int | None) -> dict[str, Any]:
    """What the node of this directory does. With no process running its config file,
    whatever answers on its address is not it (a testnet from another directory, the
    same addresses): ``taken``, and nothing of that process's is reported as this node's."""
    ip, port = node.udp
    row: dict[str, Any] = {"node": node.name, "role": node.role, "udp": host_port(ip, port),
                           "pid": pid, "up": False, "ready": False, "taken": False}  # fmt: skip
    if pid is None:
        row["taken"] = node.answers()
        return row
    try:
        info = node.status()
        row.update(up=True, ready=node.is_ready())
        if node.role == "stun":  # a relay is no overlay member: its allocations instead
            row["allocations"] = info["allocations"]
            return row
        row.update(contacts=info["routing_table_size"], records=info["records"])
        if node.role == "storage":
            row["blobs"] = _stored_blobs(node)
    except httpx.HTTPError:
        pass
    return row


def _require_started(net: Testnet) -> None:
    """`status` and `down` are about a testnet of ``net.root``: a directory none ever
    started in (a typo, a path that does not exist) is an error, not an empty network."""
    if not net.started_here():
        raise NoTestnetError(f"no testnet in {net.root}: start one with"
                             f" `dna-testnet up --dir {net.root}`")  # fmt: skip


def _status(net: Testnet, as_json: bool) -> None:
    _require_started(net)
    pids = net.running()
    rows = [_node_row(node, pids.get(node.name)) for node in net.members]
    if as_json:
        print(json.dumps(rows))
        return
    out = console()
    grid = table(out, "node", "role", "udp", "pid", "ready", "contacts", "records", "blobs")
    for r in rows:
        if not r["up"]:
            state = ("[yellow]taken[/yellow]" if r["taken"] else "[red]down[/red]"
                     if r["pid"] is None else "[yellow]starting[/yellow]")  # fmt: skip
            grid.add_row(r["node"], r["role"], r["udp"], str(r["pid"] or "-"), state, "-", "-",
                         "-")  # fmt: skip
            continue
        ready = "[green]yes[/green]" if r["ready"] else "[yellow]no[/yellow]"
        blobs = r.get("blobs")
        grid.add_row(r["node"], r["role"], r["udp"], str(r["pid"] or "?"), ready,
                     str(r.get("contacts", "-")), str(r.get("records", "-")),
                     "-" if blobs is None else str(blobs))  # fmt: skip
    out.print(grid)
    if any(r["taken"] for r in rows):
        print(
            f"taken: not running from {net.root}; another process answers on its address"
            " (a testnet from another directory?)",
            file=sys.stderr,
        )


def _say_started(net: Testnet, started: list[str]) -> None:
    """On stderr, so `up --json` prints only the status."""
    others = len(net.members) - len(started)
    if not others:
        return
    if started:
        print(f"started {', '.join(started)} ({others} already running)", file=sys.stderr)
    else:
        print(f"every node of {net.root} is already running", file=sys.stderr)


def _down(net: Testnet, as_json: bool) -> None:
    _require_started(net)
    stopped = net.down()
    if as_json:
        print(json.dumps({"stopped": [{"node": n, "pid": p} for n, p in stopped.items()]}))
    elif stopped:
        names = ", ".join(f"{name} (pid {pid})" for name, pid in stopped.items())
        print(f"stopped {len(stopped)} nodes of {net.root}: {names}")
    else:
        print(f"no testnet running in {net.root}")


def _state_dir(value: str) -> Path:
    """--dir: an empty value (an unset variable) would put the testnet's files in the
    current directory, and a file in its place fails only once nodes start."""
    if not value:
        raise argparse.ArgumentTypeError("empty path (an unset variable?); `--dir .` is here")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dna-testnet", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("command", choices=["up", "status", "down", "demo", "resilience"],
                        help="what to do (see above)")  # fmt: skip
    parser.add_argument(
        "--dir",
        type=_state_dir,
        default=Path(".dna-testnet"),
        help="state directory: configs, keys, data, logs (default .dna-testnet)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (status, down, resilience; errors as JSON on stderr)",
    )
    add_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    with quiet_broken_pipe():
        try:
            _run(args)
        except BrokenPipeError:
            raise  # quiet_broken_pipe's
        except (RuntimeError, OSError) as exc:
            if args.json:
                print(json.dumps({"error": str(exc)}), file=sys.stderr)
            else:
                print(f"dna-testnet: error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        run_demo()
        return
    if args.command == "resilience":
        if not all(outcome.passed for outcome in run_suite(args)):
            sys.exit(1)
        return
    net = Testnet(args.dir.resolve(), stun=len(TESTNET.relays))
    if args.command == "up":
        _say_started(net, net.up())
        _status(net, args.json)
    elif args.command == "status":
        _status(net, args.json)
    else:
        _down(net, args.json)
