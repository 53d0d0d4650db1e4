"""Running a node as a process: config, JSON logs, start, wait for SIGTERM, stop."""

from __future__ import annotations

import argparse
import asyncio
import resource
from pathlib import Path
from typing import Protocol

from dna_core.ops.lifecycle import GracefulShutdown, run_until_shutdown
from dna_core.ops.logs import configure_logging


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one: a node holds one descriptor per
    connection, and distributions ship a soft limit of 1024. Returns the limit now set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit is above the kernel's nr_open
        return soft
    return hard


def add_run_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    handler: object,
    env_prefix: str,
) -> None:
    run = sub.add_parser(
        "run",
        help="run the node until SIGTERM",
        description=f"Settings: defaults < --config TOML < {env_prefix}__SECTION__KEY variables.",
    )
    run.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    run.set_defaults(handler=handler)


def serve(service: Service, log_level: str) -> None:
    """Run ``service`` until SIGTERM/SIGINT, then stop it gracefully."""
    configure_logging(log_level)
    raise_open_files_limit()
    asyncio.run(run_until_shutdown(service.start, service.stop, GracefulShutdown()))
