"""`dna-testnet` as a person runs it: up, status, down, on real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from dna_testnet.network import Testnet
from dna_testnet.topology import GRPC_PORT, TESTNET
from support import BIN, on_a_terminal

# Where `dna-testnet up` puts storage1 (its addresses are fixed, so `down` finds them).
STORAGE1 = next(node.ip for node in Testnet(Path()).nodes if node.name == "storage1")

pytestmark = pytest.mark.process  # every test runs dna-testnet


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    return subprocess.run(
        [str(BIN / "dna-testnet"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    demo = run("demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "a STUN/TURN relay up" in out
    # Scenario 2 of the design: bob offline, the message is stored and fetched later.
    offline = out.index("bob is OFFLINE (no fresh presence record)")
    stored = out.index("path: stored (store-and-forward)", offline)
    assert out.index("bob got: 'Hi Bob! Sent while you were away.'") > stored
    assert "delivered: True" in out
    # Scenario 1: bob online, alice finds him by presence and both messages go direct,
    # through the testnet relay (loopback has no host candidates), held by both caches.
    online = out.index("bob is ONLINE; candidates sealed to alice: relay")
    direct = "path: direct via the TURN relay (ICE pair relay->relay), acknowledged"
    assert out.count(direct) == 2 and out.index(direct) > online, out
    for body in ("Welcome to the laptop!", "This one took the open channel."):
        assert (f"in bob's phone's cache: [{body!r}]; in alice's: [{body!r}], delivered: True"
                in out), out  # fmt: skip
        assert f"laptop got: {body!r}" in out  # mirrored by the phone
    # The laptop does not listen for direct messages: its reply is stored.
    assert out.count("path: stored (store-and-forward)") == 2
    assert "both devices hold the same history: True" in out
    assert "refused" not in demo.stderr, demo.stderr
    assert out.rstrip().endswith("demo complete")
    assert not any(tmp_path.iterdir())  # the network lived in a temporary directory


def _ready(ip: str) -> bool:
    try:
        return httpx.get(f"http://{ip}:7480/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"pid {pid} still running after {timeout:g} s"


def _check_status(cwd: Path) -> None:
    """`status` of a running testnet: a table (bare columns in a pipe) and JSON."""
    status = run("status", cwd=cwd)
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert len(rows) == 10 and status.stdout.split()[:4] == ["node", "role", "udp", "pid"]
    members = [r for r in rows if r[1] != "stun"]
    assert all(r[4] == "yes" and int(r[5]) > 0 for r in members), status.stdout
    # the relay takes the address after the last storage node's, on the STUN port
    [last_storage] = [r[2] for r in rows if r[0] == "storage6"]
    relay_ip = ip_address(last_storage.split(":")[0]) + 1
    assert [[*r[:3], r[4]] for r in rows if r[1] == "stun"] == [
        ["stun1", "stun", f"{relay_ip}:3478", "yes"]
    ], status.stdout
    nodes = json.loads(run("status", "--json", cwd=cwd).stdout)
    assert [n["role"] for n in nodes].count("bootstrap") == 3
    assert [n["role"] for n in nodes].count("storage") == 6
    overlay = [n for n in nodes if n["role"] != "stun"]
    assert all(n["ready"] and n["contacts"] > 0 and n["pid"] > 0 for n in overlay), nodes
    assert all(("blobs" in n) == (n["role"] == "storage") for n in nodes)
    [relay] = [n for n in nodes if n["role"] == "stun"]
    assert relay["ready"] and relay["pid"] > 0 and relay["allocations"] == 0, relay


def test_up_status_twice_and_down_finds_every_node(tmp_path: Path) -> None:
    up = run("up", cwd=tmp_path)
    state = tmp_path / ".dna-testnet" / "state.json"
    hand_started = None
    try:
        assert up.returncode == 0, up.stderr
        _check_status(tmp_path)
        pids = json.loads(state.read_text())["pids"]
        again = run("up", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "every node of" in again.stderr and "already running" in again.stderr
        assert json.loads(state.read_text())["pids"] == pids  # the real nodes stay recorded
        assert all(_alive(pid) for pid in pids.values())

        # a node crashes: `up` starts that one again, with its key, and leaves the rest
        os.kill(pids["storage2"], signal.SIGKILL)
        _wait_gone(pids["storage2"])
        revived = run("up", cwd=tmp_path)
        assert revived.returncode == 0, revived.stderr
        assert "started storage2 (9 already running)" in revived.stderr, revived.stderr
        now = json.loads(state.read_text())["pids"]
        assert {n: p for n, p in now.items() if n != "storage2"} == {
            n: p for n, p in pids.items() if n != "storage2"
        }
        assert now["storage2"] != pids["storage2"] and _alive(now["storage2"])
        pids = now
        _check_status(tmp_path)

        # an operator restarts storage1 by hand (a relative --config, its own session)
        os.kill(pids["storage1"], signal.SIGTERM)
        _wait_gone(pids["storage1"])
        hand_started = subprocess.Popen(
            [str(BIN / "dna-storage-node"), "run", "--config", ".dna-testnet/storage1.toml"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60  # a node starting on a loaded machine
        while time.monotonic() < deadline and not _ready(STORAGE1):
            time.sleep(0.2)
    finally:
        down = run("down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "stopped 10 nodes" in down.stdout, down.stdout
    assert f"storage1 (pid {hand_started.pid})" in down.stdout, down.stdout
    assert hand_started.wait(20) == 0  # stopped by down, cleanly
    assert not any(_alive(pid) for pid in pids.values())
    after = run("--json", "status", cwd=tmp_path)
    assert not any(n["up"] or n["pid"] for n in json.loads(after.stdout)), after.stdout
    nothing = run("down", cwd=tmp_path)
    assert nothing.returncode == 0 and "no testnet running" in nothing.stdout


def _on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """Run ``dna-testnet`` with its stdout on a pseudo-terminal; what it wrote there."""
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    return on_a_terminal([str(BIN / "dna-testnet"), *args], {**base, **env})


def stopped_testnet(root: Path) -> Path:
    """A state directory as a testnet leaves it that ran there and is down: its nodes'
    config files (what `status` takes for a testnet started there)."""
    root.mkdir(parents=True)
    for node in Testnet(root, stun=len(TESTNET.relays)).members:
        node.write_config()
    return root


def test_status_is_about_its_directory(tmp_path: Path) -> None:
    """`status --dir` of a directory no testnet ever started in listed another directory's
    running testnet (same addresses) as its own, ready, PID "?": it found the nodes by
    address. Now it says there is none (one line, exit 1, nothing made), and a directory
    whose testnet is down says its addresses are taken, no node up, ready or with a PID."""
    up = run("up", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        nowhere = tmp_path / "nowhere"
        none = run("--dir", str(nowhere), "status", cwd=tmp_path)
        assert none.returncode == 1 and none.stdout == "", none.stdout
        assert none.stderr == (f"dna-testnet: error: no testnet in {nowhere}: start one with"
                               f" `dna-testnet up --dir {nowhere}`\n")  # fmt: skip
        assert not nowhere.exists()
        other = str(stopped_testnet(tmp_path / "other"))
        nodes = json.loads(run("--json", "--dir", other, "status", cwd=tmp_path).stdout)
        assert len(nodes) == 10, nodes
        assert all(n["taken"] and not n["up"] and not n["ready"] and n["pid"] is None
                   and "contacts" not in n for n in nodes), nodes  # fmt: skip
        table = run("--dir", other, "status", cwd=tmp_path)
        rows = [line.split() for line in table.stdout.splitlines()[1:]]
        assert len(rows) == 10 and all(r[3:5] == ["-", "taken"] for r in rows), table.stdout
        assert "another process answers on its address" in table.stderr, table.stderr
    finally:
        run("down", cwd=tmp_path)


@pytest.mark.parametrize("command", ["down", "status"])
def test_a_directory_with_no_testnet_is_an_error(tmp_path: Path, command: str) -> None:
    """`down --dir` of a path no testnet ever started in (a typo, a directory that does not
    exist) said "no testnet running" and exited 0, as if it had stopped one; now it is the
    error `status` gives: one line, exit 1 (plain and --json), nothing made."""
    nowhere = tmp_path / "nowhere"
    plain = run("--dir", str(nowhere), command, cwd=tmp_path)
    assert plain.returncode == 1 and plain.stdout == "", plain.stdout
    assert plain.stderr == (f"dna-testnet: error: no testnet in {nowhere}: start one with"
                            f" `dna-testnet up --dir {nowhere}`\n")  # fmt: skip
    as_json = run("--json", "--dir", str(nowhere), command, cwd=tmp_path)
    assert as_json.returncode == 1 and as_json.stdout == "", as_json.stdout
    assert "no testnet in" in json.loads(as_json.stderr)["error"]
    assert not nowhere.exists()


def test_a_dir_that_is_empty_or_a_file_is_a_usage_error(tmp_path: Path) -> None:
    """`--dir ""` (an unset variable) started the testnet in the current directory, its
    files among the user's; `--dir FILE` failed with "[Errno 17] File exists" after
    saying it stopped the nodes it had started. Both are usage errors now, nothing made."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    empty = run("--dir", "", "up", cwd=tmp_path)  # one check of --dir for every command
    assert empty.returncode == 2 and "--dir: empty path" in empty.stderr, empty.stderr
    for command in ("up", "down"):
        file = run("--dir", str(a_file), command, cwd=tmp_path)
        assert file.returncode == 2, file.stderr
        assert f"--dir: {a_file} is not a directory" in file.stderr, file.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert a_file.read_text() == "mine"


def test_tables_are_coloured_only_on_a_terminal_without_no_color(tmp_path: Path) -> None:
    net = stopped_testnet(tmp_path / "net")
    args = ("--dir", str(net), "status")  # nothing runs: every node "down"
    coloured = _on_a_terminal(*args, env={})
    assert "\x1b[" in coloured and "down" in coloured and "─" in coloured  # colour, lines
    plain = _on_a_terminal(*args, env={"NO_COLOR": "1"})
    assert "\x1b[3" not in plain and "down" in plain  # no colour (bold headers may stay)
    piped = run(*args, cwd=tmp_path).stdout
    assert "\x1b" not in piped and "─" not in piped and len(piped.splitlines()) == 11


def test_an_up_that_fails_stops_what_it_started(tmp_path: Path) -> None:
    """A port of one node taken by something that is no node: `up` fails naming that node
    and leaves none of the others running (before, nine nodes stayed up with no state)."""
    last = Testnet(Path()).nodes[-1]
    squatter = socket.create_server((last.ip, GRPC_PORT))  # listens, never answers HTTP
    try:
        up = run("up", cwd=tmp_path)
    finally:
        squatter.close()
    assert up.returncode == 1
    assert f"{last.name} exited" in up.stderr and "stopped the nodes" in up.stderr, up.stderr
    status = run("--json", "status", cwd=tmp_path)
    assert not any(n["up"] or n["pid"] for n in json.loads(status.stdout)), status.stdout
    assert "no testnet running" in run("down", cwd=tmp_path).stdout
