"""Each node keeps its own record file by default (issue 11 item 2 follow-up).

The default used to be `records.sqlite3` in the working directory, so a bootstrap node
and a storage node started from one directory with default settings shared one file.
Now a storage node keeps it in its `[storage] data_dir`, a bootstrap node in a data
directory of its own; an explicit `[records] path` still wins.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from dna_core.overlay.aio.server import OverlayServiceConfig, RecordsSection
from dna_storage.node import StorageNodeConfig, StorageSection
from dna_testnet.harness.local import BIN

pytestmark = pytest.mark.process  # every test starts nodes


def _start(command: str, prefix: str, cwd: Path, port: int) -> subprocess.Popen[bytes]:
    """A node process with default settings but its own ports and key file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    env.update({
        f"{prefix}__NODE__UDP_PORT": str(port),
        f"{prefix}__NODE__GRPC_PORT": str(port + 1),
        f"{prefix}__NODE__KEY_FILE": f"{command}.key",
        f"{prefix}__OPS__HTTP_PORT": str(port + 2),
    })  # fmt: skip
    with (cwd / f"{command}.log").open("ab") as log:
        return subprocess.Popen(
            [str(BIN / command), "run"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def test_two_nodes_started_from_one_directory_keep_separate_record_files(
    tmp_path: Path,
) -> None:
    procs = [
        _start("dna-bootstrap", "DNA_BOOTSTRAP", tmp_path, 17400),
        _start("dna-storage-node", "DNA_STORAGE", tmp_path, 17410),
    ]
    bootstrap_file = tmp_path / "bootstrap-data" / "records.sqlite3"
    storage_file = tmp_path / "data" / "records.sqlite3"
    try:
        deadline = time.monotonic() + 60  # two processes starting on a loaded machine
        while not (bootstrap_file.exists() and storage_file.exists()):
            logs = [f.read_text() for f in tmp_path.glob("*.log")]
            assert all(p.poll() is None for p in procs), logs
            assert time.monotonic() < deadline, sorted(str(p) for p in tmp_path.rglob("*"))
            time.sleep(0.1)
        for port, path in ((17402, "bootstrap-data/records.sqlite3"),
                           (17412, "data/records.sqlite3")):  # fmt: skip
            status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
            assert status["record_file"] == path
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    assert not (tmp_path / "records.sqlite3").exists(), "a record file shared in the cwd"
    assert all(p.returncode == 0 for p in procs)


def test_an_explicit_record_path_still_wins(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.sqlite3"
    assert OverlayServiceConfig(records=RecordsSection(path=path)).records_path() == path
    assert StorageNodeConfig(records=RecordsSection(path=path)).records_path() == path
    data = tmp_path / "d"
    storage = StorageNodeConfig(storage=StorageSection(data_dir=data))
    assert storage.records_path() == data / "records.sqlite3"
    assert OverlayServiceConfig().records_path() == Path("bootstrap-data/records.sqlite3")
