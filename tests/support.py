"""Helpers shared by tests (importable as `support`: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import pty
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Protocol, TypeVar

from dna_core.crypto import Identity
from dna_core.crypto.keys import SEEDS_SIZE


def seeded_identity(name: str) -> Identity:
    """An identity derived from a name: the same keys every run."""
    return Identity(hashlib.shake_256(f"dna-test-identity/{name}".encode()).digest(SEEDS_SIZE))


T = TypeVar("T")

# How long a test waits for what a loaded machine does late (a process up, a gauge set by the
# node's next pass, a connection closed): CI runs the suite on 2 busy cores. Passing tests
# never wait it out: they poll and go on at once.
SETTLE_S = 30.0


def until(
    check: Callable[[], T], what: str, timeout_s: float = SETTLE_S, every_s: float = 0.1
) -> T:
    """Poll ``check()`` until it returns something true, and return that; fail naming
    ``what`` after ``timeout_s``. For state that changes in another process or thread:
    reading it once after a sleep makes the test's result the machine's load."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {value!r})")
        time.sleep(every_s)
    return value


async def until_async(
    check: Callable[[], T], what: str, timeout_s: float = SETTLE_S, every_s: float = 0.02
) -> T:
    """`until` in an event loop: the loop runs (the awaited tasks progress) between polls."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {value!r})")
        await asyncio.sleep(every_s)
    return value


SEED_VARIABLE = "DNA_TEST_SEED"


def run_seed(default: int | None = None) -> int:
    """The seed of a random test run: ``DNA_TEST_SEED`` when set (to replay a run it
    printed), else ``default`` (a fixed seed), else a fresh random one. The caller prints it."""
    raw = os.environ.get(SEED_VARIABLE, "").strip()
    if raw:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{SEED_VARIABLE} must be an integer, got {raw!r}") from None
    return default if default is not None else random.randrange(1 << 30)


def single_byte_tampers(data: bytes, *, limit: int | None = None, seed: int = 0) -> Iterator[bytes]:
    """Every copy of ``data`` with one byte changed (XOR 0x01 and, for variety, a random
    nonzero mask), or ``limit`` positions sampled with ``seed`` when given."""
    positions = list(range(len(data)))
    rng = random.Random(seed)
    if limit is not None and limit < len(positions):
        positions = sorted(rng.sample(positions, limit))
    for i in positions:
        for mask in {0x01, rng.randrange(1, 256)}:
            out = bytearray(data)
            out[i] ^= mask
            yield bytes(out)


BIN = Path(sys.executable).parent


def run_script(
    cmd: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a console script as a person would, with no terminal: secrets and settings come
    only from ``env`` (the test's own DNA_* variables are dropped); ``cwd`` is where the
    paths a configuration leaves relative land (the default data directories)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    return subprocess.run(
        [str(BIN / cmd), *args],
        check=False, capture_output=True, text=True, timeout=timeout,
        env={**base, **(env or {})}, stdin=subprocess.DEVNULL, cwd=cwd,
    )  # fmt: skip


def on_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal (TERM=xterm-256color);
    what it wrote there. The process must exit 0."""
    main, sub = pty.openpty()
    proc = subprocess.Popen(argv, stdout=sub, stderr=sub, stdin=subprocess.DEVNULL,
                            env={**env, "TERM": "xterm-256color"})  # fmt: skip
    os.close(sub)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the process closed its end
        while chunk := os.read(main, 65536):
            chunks.append(chunk)
    os.close(main)
    output = b"".join(chunks)
    assert proc.wait(timeout) == 0, output
    return output.decode()


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the generators are scripts, not a package), for
    the tests that check what they write."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def dna_watch(
    home: Path, seeds: Iterable[tuple[str, int]], env: dict[str, str], *, stderr: int | None = None
) -> subprocess.Popen[str]:
    """`dna --json watch` of the profile at ``home`` against ``seeds``, every 0.3 s: its
    stdout piped as text, its stderr as ``stderr`` says (None: this process's)."""
    argv = [str(BIN / "dna"), "--home", str(home), "--json", "--bootstrap",
            ",".join(f"{h}:{p}" for h, p in seeds), "watch", "--interval", "0.3"]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**env, "PATH": str(BIN)}
    )


def lines(stream: IO[str]) -> queue.Queue[str]:
    """A stream's lines as they come (read by a thread: no blocking readline in the test)."""
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            found.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return found


def wait_for(found: queue.Queue[str], text: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = found.get(timeout=left)
        except queue.Empty:
            break
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} within {timeout} s; saw {seen}")


class Startable(Protocol):
    """A whole server as its tests drive it: an overlay node's or the relay's."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


def status_once_started(make: Callable[[], Startable]) -> dict[str, Any]:
    """The /status of the server ``make()`` builds (in the loop), once it has started; then
    it is stopped."""

    async def go() -> dict[str, Any]:
        server = make()
        await server.start()
        try:
            return server.status()
        finally:
            await server.stop()

    return asyncio.run(go())


def udp_socket(host: str) -> socket.socket:
    """A non-blocking UDP socket bound to ``host`` (IPv4 or IPv6) on a free port, for an event
    loop's ``sock_recv`` and ``sock_sendto``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def datagrams_within(socks: Iterable[socket.socket], within: float) -> int:
    """How many datagrams ``socks`` receive, together, within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within

    async def count(sock: socket.socket) -> int:
        got = 0
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
            except TimeoutError:
                break
            got += 1
        return got

    return sum(await asyncio.gather(*(count(s) for s in socks)))


def ctrl_c_in_a_weakref_callback() -> None:
    """Ctrl-C as it lands in importlib's module-lock callback: Python prints it as
    "Exception ignored in" and goes on."""

    class Lock:
        pass

    def on_drop(_ref: object) -> None:
        raise KeyboardInterrupt

    lock = Lock()
    ref = weakref.ref(lock, on_drop)
    del lock  # the callback runs here, its exception goes to sys.unraisablehook
    end = time.monotonic() + 2
    while time.monotonic() < end:  # the main thread goes on, out of the callback
        pass
    raise AssertionError(f"the Ctrl-C was dropped ({ref})")
