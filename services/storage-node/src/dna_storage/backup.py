"""Backup and restore of a SQLite storage node (docs/operations.md, "Upgrades, backup and
restore").

`backup` copies, while the node runs and writes, the mailbox database and the record file
with SQLite's online backup API (one step: one read transaction, so the copy is the
database as of one commit, and WAL lets the node's writer go on meanwhile), plus the node
key, and writes a manifest of their SHA-256 sums. `restore` checks all of it before it
writes anything, then puts the files where the configuration says, with a fresh store
incarnation: the restored mailboxes are older than the cursors clients were given since the
backup, and their sequence numbers will be handed out again, so cursors of the old
incarnation must read from the start (docs/storage.md, Fetch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from dna_core import __version__
from dna_core.errors import DnaError
from dna_core.files import sync_directory, write_atomic
from dna_core.ops.node_key import load_node_key

from dna_storage.backends.sqlite import SCHEMA_VERSION
from dna_storage.node import MAILBOX_FILE, StorageNodeConfig

MANIFEST = "backup.json"
# Names in a backup; the mailbox database keeps the name it has on a node.
MAILBOXES, RECORDS, NODE_KEY = MAILBOX_FILE, "records.sqlite3", "node.key"
FORMAT = 1


def _targets(config: StorageNodeConfig) -> dict[str, Path]:
    """Where each file of a backup lives on the node, by its name in the backup."""
    _require_sqlite(config)
    return {
        MAILBOXES: config.storage.data_dir / MAILBOXES,
        RECORDS: config.records_path(),
        NODE_KEY: config.node.key_file,
    }


def _require_sqlite(config: StorageNodeConfig) -> None:
    if config.storage.backend != "sqlite":
        raise DnaError(
            "the redis backend is backed up by Redis itself (RDB or AOF files): "
            "see docs/operations.md"
        )


def backup(config: StorageNodeConfig, out: Path) -> dict[str, Any]:
    """Copy the node's files into ``out`` (absent or empty); returns the manifest."""
    targets = _targets(config)
    if not targets[MAILBOXES].is_file():
        raise DnaError(f"no mailbox database at {targets[MAILBOXES]}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DnaError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `out` and renamed into place: a failed backup leaves no half of one.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # mode 0700
    try:
        _copy_database(targets[MAILBOXES], staging / MAILBOXES)
        if targets[RECORDS].is_file():
            _copy_database(targets[RECORDS], staging / RECORDS)
        write_atomic(staging / NODE_KEY, targets[NODE_KEY].read_bytes(), mode=0o600)
        manifest = _manifest(config, staging)
        write_atomic(
            staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644
        )
        os.replace(staging, out)  # an empty `out` is replaced atomically
        sync_directory(out.parent)  # ...and durably: the databases' copies are (SQLite commits)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _copy_database(source: Path, copy: Path) -> None:
    """A consistent copy of a live WAL database (read-only: never creates the source)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src:
            src.execute("PRAGMA busy_timeout = 10000")
            with contextlib.closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)  # all pages in one step: one snapshot
    except sqlite3.Error as exc:
        raise DnaError(f"cannot copy {source}: {exc}") from None


def _manifest(config: StorageNodeConfig, staging: Path) -> dict[str, Any]:
    node = load_node_key(staging / NODE_KEY, config.node.puzzle_bits)
    with contextlib.closing(sqlite3.connect(staging / MAILBOXES)) as db:
        blobs, size = db.execute("SELECT blobs, bytes FROM totals").fetchone()
        schema = db.execute("PRAGMA user_version").fetchone()[0]
    return {
        "format": FORMAT,
        "version": __version__,
        "created_ms": time.time_ns() // 1_000_000,
        "node_id": node.node_id.hex(),
        "schema_version": schema,
        "blobs": blobs,
        "bytes": size,
        "files": {path.name: _sha256(path) for path in sorted(staging.iterdir()) if path.is_file()},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def restore(config: StorageNodeConfig, source: Path) -> dict[str, Any]:
    """Put the backup in ``source`` in place for a node that has no data yet; returns
    its manifest. Everything is checked before the first file is written."""
    targets = _targets(config)
    manifest = verify(source, config)
    present = [
        str(path)
        for path in (*targets.values(), targets[MAILBOXES].with_name(MAILBOXES + "-wal"))
        if path.exists()
    ]
    if present:
        raise DnaError(f"restore needs a fresh node, but {present[0]} exists")
    placed: list[Path] = []
    try:
        for name, target in targets.items():
            if name in manifest["files"]:
                target.parent.mkdir(parents=True, exist_ok=True)
                _place(source / name, target, fresh_incarnation=name == MAILBOXES)
                placed.append(target)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    return manifest


def _place(source: Path, target: Path, *, fresh_incarnation: bool) -> None:
    """Copy under a temporary name in the target's directory, then rename."""
    partial = target.with_name(f".{target.name}.restoring")
    try:
        shutil.copy2(source, partial)
        if fresh_incarnation:
            with contextlib.closing(sqlite3.connect(partial)) as db, db:
                db.execute("UPDATE meta SET value = randomblob(8) WHERE key = 'incarnation'")
        _fsync(partial)  # whole on disk before it has the name a node starts from
        os.replace(partial, target)
        sync_directory(target.parent)
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(source: Path, config: StorageNodeConfig) -> dict[str, Any]:
    """The backup's manifest, once every file is checked against it; else a DnaError
    naming the first thing wrong."""
    try:
        manifest: dict[str, Any] = json.loads((source / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        schema = int(manifest["schema_version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DnaError(f"{source} is not a storage node backup ({MANIFEST}: {exc})") from None
    if manifest.get("format") != FORMAT or not {MAILBOXES, NODE_KEY} <= set(files):
        raise DnaError(f"{source}/{MANIFEST} is not a backup manifest this version reads")
    if not set(files) <= {MAILBOXES, RECORDS, NODE_KEY}:
        raise DnaError(f"{source}/{MANIFEST} names files a backup does not hold")
    if schema > SCHEMA_VERSION:
        raise DnaError(f"{source} holds schema {schema}: this version reads up to {SCHEMA_VERSION}")
    for name, expected in files.items():
        path = source / name
        if not path.is_file() or _sha256(path) != expected:
            raise DnaError(f"{path} is missing or corrupt (SHA-256 differs from {MANIFEST})")
    node = load_node_key(source / NODE_KEY, config.node.puzzle_bits)
    if node.node_id.hex() != manifest.get("node_id"):
        raise DnaError(f"{source}/{NODE_KEY} is not the key of node {manifest.get('node_id')}")
    return manifest
