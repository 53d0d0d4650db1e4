"""JSON log lines: each parses on its own and carries the node's context and the call's extras."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dna_core.ops.logs import JsonFormatter, configure_logging, node_logger


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Our handler on the root logger for one test, then the root logger as it was."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    configure_logging("debug", out)
    yield out
    for handler in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_core_fields(stream: io.StringIO) -> None:
    logging.getLogger("dna.test").warning("disk %d%% full", 91)
    (line,) = lines(stream)
    assert line["level"] == "WARNING"
    assert line["logger"] == "dna.test"
    assert line["msg"] == "disk 91% full"
    ts = datetime.fromisoformat(line["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert line["ts"].endswith("Z")
    assert abs(datetime.now(UTC) - ts) < timedelta(seconds=5)


def test_node_context_and_extras(stream: io.StringIO) -> None:
    alpha = node_logger("dna.storage", node_id="ab12", role="storage")
    beta = node_logger("dna.storage", node_id="cd34", role="storage")
    alpha.info("stored", extra={"blob": "ff00", "bytes": 1200, "where": Path("/x")})
    beta.info("stored")
    first, second = lines(stream)
    assert first["node_id"] == "ab12"
    assert first["role"] == "storage"
    assert (first["blob"], first["bytes"], first["where"]) == ("ff00", 1200, "/x")
    assert second["node_id"] == "cd34"  # two nodes, one logger name, separate context
    assert "blob" not in second


def test_context_wins_over_call_extras(stream: io.StringIO) -> None:
    node_logger("dna.t", node_id="mine").info("x", extra={"node_id": "someone else"})
    assert lines(stream)[0]["node_id"] == "mine"


def test_core_fields_win_over_extras(stream: io.StringIO) -> None:
    logging.getLogger("dna.t").info("real", extra={"level": "fake", "ts": "fake"})
    line = lines(stream)[0]
    assert line["level"] == "INFO"
    assert line["ts"] != "fake"


def test_exception_is_one_line(stream: io.StringIO) -> None:
    log = node_logger("dna.t", node_id="n1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    assert len(stream.getvalue().splitlines()) == 1
    line = lines(stream)[0]
    assert line["level"] == "ERROR"
    assert "RuntimeError: boom" in line["exc"]
    assert line["node_id"] == "n1"


def test_level_filters(stream: io.StringIO) -> None:
    configure_logging("warning", stream)
    logging.getLogger("dna.t").info("hidden")
    logging.getLogger("dna.t").error("shown")
    assert [line["msg"] for line in lines(stream)] == ["shown"]


def test_configuring_twice_does_not_duplicate(stream: io.StringIO) -> None:
    other = io.StringIO()
    configure_logging("info", other)
    logging.getLogger("dna.t").info("once")
    assert stream.getvalue() == ""
    assert len(other.getvalue().splitlines()) == 1


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", io.StringIO())


def test_context_keys_that_would_break_logging() -> None:
    with pytest.raises(ValueError, match="clash"):
        node_logger("dna.t", msg="x")


def test_unencodable_values_are_stringified() -> None:
    record = logging.LogRecord("dna.t", logging.INFO, __file__, 1, "m", (), None)
    record.obj = object()
    assert json.loads(JsonFormatter().format(record))["obj"].startswith("<object object")
