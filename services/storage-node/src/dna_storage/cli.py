"""`dna-storage-node`: an overlay member holding replicated, encrypted mailboxes.

`dna-storage-node run --config storage.toml` serves routing on UDP, records and
mailboxes on gRPC (with health and reflection), and /healthz, /readyz, /metrics,
/status over HTTP, until SIGTERM. `backup` copies a running SQLite node's mailboxes,
records and key into a directory; `restore` puts such a copy in place for a fresh node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dna_core.ops.cli import run, service_parser
from dna_core.ops.config import load_config
from dna_core.ops.service import add_config_commands, add_run_command, serve
from dna_core.overlay import config_warnings

from dna_storage import backup
from dna_storage.node import StorageNode, StorageNodeConfig

ENV_PREFIX = "DNA_STORAGE"


def _run(args: argparse.Namespace) -> None:
    config = load_config(StorageNodeConfig, args.config, env_prefix=ENV_PREFIX)
    serve(StorageNode(config), config.log_level)


def _backup(args: argparse.Namespace) -> None:
    config = load_config(StorageNodeConfig, args.config, env_prefix=ENV_PREFIX)
    manifest = backup.backup(config, args.out)
    print(json.dumps({"out": str(args.out), **manifest}))


def _restore(args: argparse.Namespace) -> None:
    config = load_config(StorageNodeConfig, args.config, env_prefix=ENV_PREFIX)
    manifest = backup.restore(config, args.source)
    print(json.dumps({"restored_from": str(args.source), **manifest}))


def _add_backup_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    make = sub.add_parser(
        "backup",
        help="copy a node's mailboxes, records and key into a new directory (SQLite; "
        "safe while the node runs)",
    )
    make.add_argument("--config", type=Path, default=None, help="the node's TOML configuration")
    make.add_argument("--out", type=Path, required=True, help="absent or empty directory")
    make.set_defaults(handler=_backup)
    put_back = sub.add_parser(
        "restore",
        help="check a backup and put it in place for a node with no data yet (same node "
        "key, fresh store incarnation)",
    )
    put_back.add_argument("--config", type=Path, default=None, help="the new node's TOML")
    put_back.add_argument("--from", dest="source", type=Path, required=True,
                          help="a directory written by `backup`")  # fmt: skip
    put_back.set_defaults(handler=_restore)


def main() -> None:
    parser, sub = service_parser("dna-storage-node", "Storage node of the DNA network.")
    add_run_command(sub, _run, ENV_PREFIX)
    add_config_commands(sub, StorageNodeConfig, ENV_PREFIX, config_warnings)
    _add_backup_commands(sub)
    sys.exit(run(parser))
