"""Running a node as a process: config, JSON logs, start, wait for SIGTERM, stop."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Protocol

from dna_core.ops.lifecycle import GracefulShutdown, run_until_shutdown
from dna_core.ops.logs import configure_logging


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


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
    asyncio.run(run_until_shutdown(service.start, service.stop, GracefulShutdown()))
