"""Graceful shutdown: a real process gets a real signal and runs its stop step before exiting 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from dna_core.ops.lifecycle import GracefulShutdown, run_until_shutdown

# A node in miniature: start, wait for a signal, stop (fail readiness, drain, close), exit.
NODE = """
import asyncio, sys
from dna_core.ops.lifecycle import GracefulShutdown, run_until_shutdown
from dna_core.ops.logs import configure_logging

HANG = len(sys.argv) > 1 and sys.argv[1] == "hang"

async def start():
    print("READY", flush=True)

async def stop():
    print("not ready", flush=True)
    await asyncio.sleep(0.01)
    print("drained", flush=True)
    if HANG:
        await asyncio.sleep(3600)
    print("closed", flush=True)

async def main():
    configure_logging("info")
    shutdown = GracefulShutdown()
    await run_until_shutdown(start, stop, shutdown)
    print("exit after", shutdown.signal.name, flush=True)

asyncio.run(main())
"""


def start_node(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "READY\n"
    return proc


@pytest.mark.process  # starts a process itself
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_runs_stop_then_exits_zero(sig: signal.Signals) -> None:
    proc = start_node()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["not ready", "drained", "closed", f"exit after {sig.name}"]
    logged = [json.loads(line) for line in err.splitlines()]
    assert {"msg": "shutdown requested", "signal": sig.name}.items() <= logged[0].items()


@pytest.mark.process  # starts a process itself
def test_second_signal_kills_a_hanging_stop() -> None:
    proc = start_node("hang")
    assert proc.stdout is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "not ready\n"
    assert proc.stdout.readline() == "drained\n"
    proc.send_signal(signal.SIGTERM)  # our handler is gone: default action, terminate now
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGTERM


def test_in_process_signal_and_uninstall() -> None:
    """SIGUSR1 so pytest's own SIGINT handling is untouched."""

    async def main() -> None:
        with GracefulShutdown((signal.SIGUSR1,)) as shutdown:
            assert not shutdown.requested
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.wait_for(shutdown.wait(), timeout=5)
            assert shutdown.requested
            assert shutdown.signal == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    asyncio.run(main())


def test_request_from_code_runs_stop() -> None:
    steps: list[str] = []
    shutdown = GracefulShutdown((signal.SIGUSR1,))

    async def start() -> None:
        steps.append("start")
        asyncio.get_running_loop().call_soon(shutdown.request)

    async def stop() -> None:
        steps.append("stop")

    asyncio.run(run_until_shutdown(start, stop, shutdown))
    assert steps == ["start", "stop"]
    assert shutdown.signal is None


def test_failed_start_skips_stop_and_releases_signals() -> None:
    steps: list[str] = []

    async def start() -> None:
        raise OSError("port in use")

    async def stop() -> None:
        steps.append("stop")

    with pytest.raises(OSError, match="port in use"):
        asyncio.run(run_until_shutdown(start, stop, GracefulShutdown((signal.SIGUSR1,))))
    assert steps == []
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_cancelled_wait_still_stops() -> None:
    steps: list[str] = []

    async def start() -> None:
        steps.append("start")

    async def stop() -> None:
        steps.append("stop")

    async def main() -> None:
        task = asyncio.create_task(
            run_until_shutdown(start, stop, GracefulShutdown((signal.SIGUSR1,)))
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert steps == ["start", "stop"]


def test_ctrl_c_while_parsing_or_in_a_one_shot_command_exits_130() -> None:
    """Before a service installs its own SIGINT handler (argparse, config loading) or in a
    command that has none (`config check`, backups): 130 and no traceback, like a shell."""
    import argparse

    from dna_core.ops.cli import run

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    parser = argparse.ArgumentParser(prog="dna-node")
    parser.set_defaults(handler=interrupted)
    assert run(parser, []) == 130
    parser.parse_args = interrupted  # type: ignore[assignment,method-assign]
    assert run(parser, []) == 130
