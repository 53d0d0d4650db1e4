"""Running a node as a process: config, JSON logs, start, wait for SIGTERM, stop."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import prometheus_client

from dna_core.ops.config import default_toml, dump_config, load_config
from dna_core.ops.heap import bound_malloc, freeze_startup_heap
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


def add_config_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    config_cls: type[Any],
    env_prefix: str,
    warnings: Callable[[Any], list[str]] = lambda config: [],
) -> None:
    """`check-config` and `print-default-config`, for the config `run` loads."""
    check = sub.add_parser(
        "check-config",
        help="load the configuration as `run` would and print it (secrets masked)",
        description="Exit 0 and print the effective configuration as JSON, with warnings on "
        "stderr; exit 1 with one line naming the key if it is unusable.",
    )
    check.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    check.set_defaults(handler=lambda args: _check_config(args, config_cls, env_prefix, warnings))
    defaults = sub.add_parser(
        "print-default-config", help="print every setting with its default, as TOML"
    )
    defaults.set_defaults(handler=lambda args: print(default_toml(config_cls), end=""))


def _check_config(
    args: argparse.Namespace,
    config_cls: type[Any],
    env_prefix: str,
    warnings: Callable[[Any], list[str]],
) -> None:
    config = load_config(config_cls, args.config, env_prefix=env_prefix)
    for warning in warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(dump_config(config), indent=2))


def serve(service: Service, log_level: str) -> None:
    """Run ``service`` until SIGTERM/SIGINT, then stop it gracefully."""
    configure_logging(log_level)
    raise_open_files_limit()
    bound_malloc()  # before any thread: every node's threads hold blobs or messages
    # A `_created` series per counter doubles what is scraped and stored for a Unix time
    # nobody graphs; Prometheus tracks resets itself.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    asyncio.run(run_until_shutdown(_started(service), service.stop, GracefulShutdown()))


def _started(service: Service) -> Callable[[], Awaitable[None]]:
    """``service.start``, then what it set up frozen out of the collector's way (a full
    collection would walk it all again, pausing every request: `dna_core.ops.heap`)."""

    async def start() -> None:
        await service.start()
        freeze_startup_heap()

    return start
