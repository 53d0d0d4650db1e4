"""A node that cannot start says why in one line and exits 1 (issue 11 #5, #6): real
`dna-bootstrap` / `dna-storage-node` processes, each with one thing wrong."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import NodeProcess, free_ips, wait_ready
from support import BIN, run_script

pytestmark = pytest.mark.process  # every test starts a node process

IP = free_ips(1)[0]


def config(tmp_path: Path, name: str, *, node: str = "", ops: str = "", top: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'log_level = "info"\n{top}\n[node]\nhost = "{IP}"\nkey_file = "{tmp_path / name}.key"\n'
        f'puzzle_bits = 4\n{node}\n[ops]\nhttp_host = "{IP}"\n{ops}\n'
    )
    return path


def one_line_error(out: subprocess.CompletedProcess[str], prog: str) -> str:
    """The run failed with exactly one line that is not a JSON log line, and no traceback."""
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    plain = [line for line in text.splitlines() if line and not line.startswith("{")]
    assert len(plain) == 1, plain
    (line,) = plain
    assert line.startswith(f"{prog}: error: "), line
    for log_line in (line for line in text.splitlines() if line.startswith("{")):
        json.loads(log_line)
    return line


def run(
    prog: str, path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # in the test's directory: a node that fails after opening its store (default data
    # directory, relative) must not leave it in the repository
    return run_script(prog, "run", "--config", str(path), env=env, timeout=30, cwd=path.parent)


@pytest.fixture(scope="module")
def first_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A bootstrap node on IP (UDP 7400, gRPC 7401, HTTP 7480)."""
    node = NodeProcess("first", IP, tmp_path_factory.mktemp("first"), [])
    node.start()
    try:
        wait_ready([node])
        yield node
    finally:
        node.kill()


def test_a_taken_grpc_port_is_refused_naming_it(tmp_path: Path, first_node: NodeProcess) -> None:
    path = config(tmp_path, "second", node="udp_port = 7500", ops="http_port = 7580")
    line = one_line_error(run("dna-bootstrap", path), "dna-bootstrap")
    assert f"{IP}:7401" in line and "gRPC" in line, line
    assert first_node.alive()


@pytest.mark.parametrize(
    ("node", "ops", "where"),
    [
        ("", "", f"{IP}:7401"),  # every port taken: gRPC is bound first
        ("grpc_port = 7501", "", f"UDP {IP}:7400"),
        ("grpc_port = 7501\nudp_port = 7500", "", f"HTTP {IP}:7480"),
    ],
)
def test_each_taken_port_is_named(
    tmp_path: Path, first_node: NodeProcess, node: str, ops: str, where: str
) -> None:
    path = config(tmp_path, "second", node=node, ops=ops)
    line = one_line_error(run("dna-bootstrap", path), "dna-bootstrap")
    assert where in line, line


@pytest.mark.parametrize(
    ("node", "top", "named"),
    [
        ("grpc_port = 99999", "", "grpc_port"),
        ("udp_port = 99999", "", "udp_port"),
        ("", 'log_level = "loud"', "log_level"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, node: str, top: str, named: str
) -> None:
    path = config(tmp_path, "bad", node=node)
    if top:
        path.write_text(path.read_text().replace('log_level = "info"', top))
    line = one_line_error(run("dna-bootstrap", path), "dna-bootstrap")
    assert line.startswith(f"dna-bootstrap: error: {path}: "), line  # the source: the file
    assert named in line, line


@pytest.mark.parametrize(
    ("prog", "var", "value", "expected"),
    [
        ("dna-bootstrap", "DNA_BOOTSTRAP__NODE__UDP_PORT", "seven",
         "node.udp_port: cannot parse 'seven' as int"),
        ("dna-bootstrap", "DNA_BOOTSTRAP__NODE__UDP_PORTS", "7400",
         "node.udp_ports: unknown key (known: node.host,"),
        ("dna-storage-node", "DNA_STORAGE__ADMISSION__DISK_HIGH_WATER", "1.5",
         "admission.disk_high_water: input should be less than or equal to 1, got 1.5"),
        ("dna-storage-node", "DNA_STORAGE__STORAGE__BACKEND", "mysql",
         "storage.backend: input should be 'sqlite' or 'redis', got 'mysql'"),
        # a node-ID puzzle no key can be minted for (a traceback from the minting, before)
        ("dna-storage-node", "DNA_STORAGE__NODE__PUZZLE_BITS", "99",
         "node.puzzle_bits: input should be less than or equal to 32, got 99"),
    ],
)  # fmt: skip
def test_a_bad_environment_variable_is_one_line_naming_it_and_the_key(
    tmp_path: Path, prog: str, var: str, value: str, expected: str
) -> None:
    """The variable wins over a good file, and the line names the variable, not the file."""
    line = one_line_error(run(prog, config(tmp_path, "bad"), env={var: value}), prog)
    assert line.startswith(f"{prog}: error: {var}: {expected}"), line
    assert not (tmp_path / "bad.key").exists()  # refused before anything was made


def test_a_bad_bootstrap_address_is_one_line(tmp_path: Path) -> None:
    path = config(tmp_path, "bad")
    path.write_text(path.read_text() + '[overlay]\nbootstrap = ["nonsense"]\n')
    line = one_line_error(run("dna-bootstrap", path), "dna-bootstrap")
    assert "bootstrap" in line and "nonsense" in line, line


def test_an_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = config(tmp_path, "store")
    path.write_text(
        path.read_text()
        + f'[storage]\nbackend = "redis"\nredis_url = "redis://:pw@127.0.0.1:{port}/0"\n'
    )
    line = one_line_error(run("dna-storage-node", path), "dna-storage-node")
    assert f"127.0.0.1:{port}" in line and "redis" in line.lower(), line
    assert ":pw@" not in line


def run_on_read_only(prog: str, path: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """``prog`` with ``state`` mounted read-only in a mount namespace of its own (root: the
    test fails, not skips, without it)."""
    script = (
        f'mount --bind "{state}" "{state}" && mount -o remount,ro,bind "{state}" "{state}"'
        f' && exec "{BIN / prog}" run --config "{path}"'
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], check=False,
                          capture_output=True, text=True, timeout=30, env=base,
                          stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize("prog", ["dna-bootstrap", "dna-storage-node"])
def test_a_read_only_state_directory_is_one_line_naming_it(tmp_path: Path, prog: str) -> None:
    """A node whose records (bootstrap) or mailboxes (storage) directory is on a read-only
    mount says which directory and why, instead of SQLite's bare "unable to open"."""
    state = tmp_path / "state"
    state.mkdir()
    path = config(tmp_path, "ro")
    section = "[records]\npath" if prog == "dna-bootstrap" else "[storage]\ndata_dir"
    target = state / "records" if prog == "dna-bootstrap" else state
    path.write_text(path.read_text() + f'{section} = "{target}"\n')
    line = one_line_error(run_on_read_only(prog, path, state), prog)
    assert f"{state} is not writable: a read-only file system" in line, line
