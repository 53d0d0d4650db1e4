"""Process lifecycle: SIGTERM/SIGINT request a graceful stop; the node decides what that means.

The stop sequence every service follows (``stop`` passed to ``run_until_shutdown``):
fail readiness first (``/readyz`` 503, gRPC health NOT_SERVING) so balancers stop sending,
drain in-flight work, then close listeners and stores.

Only the first signal is graceful: after it our handlers are removed, so a second Ctrl-C or
SIGTERM gets Python's default behaviour and kills a stop that hangs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

from dna_core.ops.logs import Log

__all__ = ["GracefulShutdown", "run_until_shutdown"]


class GracefulShutdown:
    """Turns the first SIGTERM/SIGINT into an awaitable request (``install`` on the running
    loop, or use it as a ``with`` block inside a coroutine). ``request()`` does the same from
    code, e.g. a test or an admin RPC."""

    def __init__(
        self,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
        *,
        log: Log | None = None,
    ) -> None:
        self._signals = tuple(signals)
        self._log = log if log is not None else logging.getLogger(__name__)
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.signal: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        """Hook the signals on the running loop (must be called from a coroutine)."""
        self._loop = asyncio.get_running_loop()
        for sig in self._signals:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        """Give the signals back to their default handling. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            for sig in self._signals:
                loop.remove_signal_handler(sig)

    def request(self) -> None:
        """Ask for a graceful stop."""
        self._event.set()

    async def wait(self) -> None:
        """Return once a stop was requested."""
        await self._event.wait()

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signal = sig
        self._log.info("shutdown requested", extra={"signal": sig.name})
        self.uninstall()
        self.request()

    def __enter__(self) -> GracefulShutdown:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


async def run_until_shutdown(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    shutdown: GracefulShutdown | None = None,
) -> None:
    """``await start()``, wait for a stop request, ``await stop()``.

    ``stop`` runs even if the wait is cancelled, but not if ``start`` failed: ``start`` cleans
    up after itself, since only it knows how far it got.
    """
    with shutdown if shutdown is not None else GracefulShutdown() as requested:
        await start()
        try:
            await requested.wait()
        finally:
            await stop()
