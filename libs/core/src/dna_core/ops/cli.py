"""The command-line skeleton every service shares (`--version`, and `keygen` for overlay
members)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dna_core import __version__
from dna_core.crypto.node import DEFAULT_PUZZLE_BITS, MAX_PUZZLE_BITS
from dna_core.errors import DnaError
from dna_core.ops.node_key import create_node_key


def service_parser(
    prog: str, description: str, *, node_key: bool = True
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:  # type: ignore[type-arg]
    """The parser of a service's command; ``keygen`` only for one with a node key (an overlay
    member: a key minted for a service that never reads one would mislead its operator)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if not node_key:
        return parser, sub
    keygen = sub.add_parser("keygen", help="mint a node key that solves the ID puzzle")
    keygen.add_argument("--out", type=Path, required=True, help="where to write the key (0600)")
    keygen.add_argument(
        "--puzzle-bits", type=_puzzle_bits, default=DEFAULT_PUZZLE_BITS,
        help=f"leading zero bits of the node ID, 0-{MAX_PUZZLE_BITS} (default"
        f" {DEFAULT_PUZZLE_BITS}; the network's [node] puzzle_bits)",
    )  # fmt: skip
    keygen.set_defaults(handler=_keygen)
    return parser, sub


def _puzzle_bits(value: str) -> int:
    """A usage error, not a traceback from deep in the minting."""
    bits = int(value) if value.lstrip("-").isdigit() else -1
    if not 0 <= bits <= MAX_PUZZLE_BITS:
        raise argparse.ArgumentTypeError(f"{value!r} is not 0-{MAX_PUZZLE_BITS}")
    return bits


def _keygen(args: argparse.Namespace) -> None:
    if args.out.exists():  # before minting, which takes minutes at a high puzzle
        raise FileExistsError(f"{args.out} exists: a node key is never overwritten")
    started = time.perf_counter()
    node, attempts = create_node_key(args.out, args.puzzle_bits)
    print(
        json.dumps(
            {
                "node_id": node.node_id.hex(),
                "public_key": node.public_key.hex(),
                "puzzle_bits": args.puzzle_bits,
                "keys_tried": attempts,
                "seconds": round(time.perf_counter() - started, 3),
                "path": str(args.out),
            }
        )
    )


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and dispatch; a DnaError or OSError becomes one clear line and exit code 1, and
    Ctrl-C before the service has its own handler (or in a one-shot command) exits 130."""
    try:
        args = parser.parse_args(argv)
        args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except (DnaError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
