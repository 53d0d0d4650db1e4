"""`dna-stun` that cannot start says why in one line and exits 1: real processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from stun_node import TAKEN, free_port, stun_toml
from support import run_script

pytestmark = pytest.mark.process  # every test starts dna-stun

HOST = "127.0.0.1"


def _one_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    plain = [line for line in text.splitlines() if line and not line.startswith("{")]
    assert len(plain) == 1, plain
    return plain[0]


def test_a_taken_udp_port_is_named(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        path = tmp_path / "stun.toml"
        path.write_text(stun_toml(HOST, port, free_port(HOST, socket.SOCK_STREAM)))
        out = run_script("dna-stun", "run", "--config", str(path), timeout=60)
    assert out.returncode == 1
    line = _one_line(out.stdout + out.stderr)
    assert line.startswith(f"dna-stun: error: cannot listen on UDP {HOST}:{port}"), line
    assert TAKEN in line, line  # what the harness retries on


def test_a_bad_setting_is_named(tmp_path: Path) -> None:
    path = tmp_path / "stun.toml"
    path.write_text('[auth]\nusers = ["nopassword"]\n')
    out = run_script("dna-stun", "run", "--config", str(path), timeout=60)
    assert out.returncode == 1
    line = _one_line(out.stdout + out.stderr)
    assert "auth.users" in line and "name:password" in line, line


def test_a_relay_address_this_host_does_not_have_is_named(tmp_path: Path) -> None:
    # Before, the relay started and was ready, then refused every Allocate (508, counted
    # no_relay_port) without a word: its relay sockets could not bind 198.51.100.77.
    path = tmp_path / "stun.toml"
    udp, http = free_port(HOST), free_port(HOST, socket.SOCK_STREAM)
    toml = stun_toml(HOST, udp, http).replace(
        "[server]\n", '[server]\nrelay_host = "198.51.100.77"\n'
    )
    path.write_text(toml)
    out = run_script("dna-stun", "run", "--config", str(path), timeout=60)
    assert out.returncode == 1
    line = _one_line(out.stdout + out.stderr)
    assert line.startswith("dna-stun: error: cannot relay on 198.51.100.77 ([server] relay_host)")
    assert "must be an address of this host" in line, line
