"""`check-config` and `print-default-config` of the node commands, and the warning a node
gives when `[node] host` is left out (issue 11 #11), run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from dna_bootstrap.cli import ENV_PREFIX as BOOTSTRAP_ENV
from dna_core.ops.config import load_config
from dna_core.overlay.aio.server import OverlayServiceConfig
from dna_storage.cli import ENV_PREFIX as STORAGE_ENV
from dna_storage.node import StorageNodeConfig
from support import BIN, run_script

pytestmark = pytest.mark.process  # every test runs a service's command

SERVICES = [
    ("dna-bootstrap", OverlayServiceConfig, BOOTSTRAP_ENV),
    ("dna-storage-node", StorageNodeConfig, STORAGE_ENV),
]


@pytest.mark.parametrize(("prog", "cls", "prefix"), SERVICES)
def test_the_default_config_reads_back_as_the_defaults(
    tmp_path: Path, prog: str, cls: type, prefix: str
) -> None:
    printed = run_script(prog, "print-default-config")
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / "default.toml"
    path.write_text(printed.stdout)
    assert load_config(cls, path, env_prefix=prefix, env={}) == cls()
    checked = run_script(prog, "check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["node"]["key_file"] == "***"
    # unset, as printed (a commented-out key): not ".", the working directory (it was)
    assert json.loads(checked.stdout)["records"]["path"] is None
    assert "warning: node.host is 127.0.0.1" in checked.stderr  # left at its default


def test_check_config_names_the_bad_key_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nhost = "203.0.113.7"\ngrpc_port = "x"\n')
    out = run_script("dna-storage-node", "check-config", "--config", str(path))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"dna-storage-node: error: {path}: node.grpc_port: expected int, got str 'x'"
    ]
    path.write_text('[node]\nhost = "203.0.113.7"\n')
    out = run_script("dna-storage-node", "check-config", "--config", str(path))
    assert out.returncode == 0 and out.stderr == ""  # a public address: nothing to warn about


def test_print_default_config_into_a_closed_pipe_is_quiet() -> None:
    out = subprocess.run(
        f"{BIN / 'dna-storage-node'} print-default-config | head -1",
        check=False, shell=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout == 'log_level = "info"\n' and out.stderr == ""


def test_a_node_without_host_warns_that_nobody_else_can_reach_it(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nkey_file = "{tmp_path / "node.key"}"\npuzzle_bits = 4\n')
    log = tmp_path / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dna-bootstrap"), "run", "--config", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        status = _wait_for_status("http://127.0.0.1:7480/status", proc)
    finally:
        proc.terminate()
        proc.wait(15)
    assert status["role"] == "bootstrap"
    # the record file: unset in the config (it showed "."), the one used beside it
    assert status["config"]["records"]["path"] is None
    assert status["record_file"] == str(Path("bootstrap-data") / "records.sqlite3")
    assert any("node.host is 127.0.0.1" in w for w in status["warnings"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(
        line["level"] == "WARNING" and "node.host is 127.0.0.1" in line["msg"] for line in lines
    )


def _wait_for_status(url: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node exited"
        try:
            data: dict[str, Any] = httpx.get(url, timeout=2).json()
            return data
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("no /status within 30 s")
