"""Structured logs: one JSON object per line, so operators can grep and ship them unparsed.

Every line carries ``ts`` (ISO-8601, UTC), ``level``, ``logger`` and ``msg``, then any ``extra``
fields of the call. Many nodes share one process in tests and the simulator, so node identity
does not live in logger names or globals: ``node_logger`` returns an adapter that stamps its own
fixed context (``node_id``, ``role``, ...) on every line it emits.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "Log", "LogThrottle", "configure_logging", "node_logger"]

# What a caller may pass as a logger: a plain one or a node's adapter.
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
# Extras that only make sense on a terminal (uvicorn's ANSI-coloured copy of each message).
_DROPPED_EXTRAS = frozenset({"color_message"})


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line; values JSON cannot encode are rendered with ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRS and key not in _DROPPED_EXTRAS
        }
        # The four core fields win over extras of the same name: the schema is a contract.
        line.update(
            ts=_iso_utc(record.created),
            level=record.levelname,
            logger=record.name,
            msg=record.getMessage(),
        )
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we installed, so configuring twice replaces it instead of doubling."""


def configure_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every log line of the process (uvicorn, grpc, ours) as JSON to ``stream``.

    ``stream`` defaults to ``sys.stderr`` as it is at call time (not import time, which matters
    when a test harness swaps it). Handlers we did not install are left alone.
    """
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r} (use one of {', '.join(sorted(levels))})")
    handler = _JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levels[name])
    return handler


class _ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds the node's fixed context to each call's ``extra``; the context wins on a clash, so
    a line's ``node_id`` always names the node that wrote it."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**kwargs.get("extra", {}), **(self.extra or {})}
        return msg, kwargs


def node_logger(name: str, **context: object) -> logging.LoggerAdapter[logging.Logger]:
    """A logger for one node: ``node_logger("dna.storage", node_id=..., role="storage")``."""
    clashes = sorted(set(context) & _RECORD_ATTRS)
    if clashes:
        raise ValueError(f"log context keys clash with LogRecord attributes: {clashes}")
    fixed: Mapping[str, object] = dict(context)
    return _ContextAdapter(logging.getLogger(name), fixed)


def _iso_utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class LogThrottle:
    """At most one line per key every ``every_s`` (by ``clock``), for what a sender can make
    happen again and again (a bug one datagram or call trips): the lines held back are
    counted and the next admitted line says how many (``suppressed``)."""

    def __init__(self, every_s: float, clock: Callable[[], float]) -> None:
        self.every_s, self._clock = every_s, clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def admit(self, key: Hashable = None) -> int | None:
        """None: hold this line back (counted); else log it, with the number held back."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
