"""`dna-stun`'s operator view: every series the docs name is exported from the start, at 0,
and /status shows the warnings logged at start."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from dna_stun.config import StunServiceConfig
from dna_stun.core import AUTH_FAILURE_REASONS, DIRECTIONS, REFUSAL_REASONS, REQUEST_KINDS
from dna_stun.service import StunServer
from prometheus_client import generate_latest
from support import status_once_started

OPERATIONS = Path(__file__).parents[2] / "docs" / "operations.md"
LABELLED = {
    "dna_stun_relayed_packets_total": ("direction", DIRECTIONS),
    "dna_stun_relayed_bytes_total": ("direction", DIRECTIONS),
    "dna_stun_auth_failures_total": ("reason", AUTH_FAILURE_REASONS),
    "dna_stun_refusals_total": ("reason", REFUSAL_REASONS),
    "dna_stun_requests_total": ("method", REQUEST_KINDS),
}


def _scrape_fresh_server() -> str:
    config = StunServiceConfig.model_validate(
        {
            "log_level": "warning",
            "server": {"host": "127.0.0.1", "udp_port": 0},
            "auth": {"users": ["u:p"]},
            "ops": {"http_host": "127.0.0.1", "http_port": 0},
        }
    )

    async def scrape() -> str:
        server = StunServer(config)
        await server.start()
        try:
            return generate_latest(server.registry).decode()
        finally:
            await server.stop()

    return asyncio.run(scrape())


def test_a_fresh_relay_exports_every_labelled_series_at_zero() -> None:
    # Before, a series appeared at its first event: rate() missed that event, and dashboards
    # and alerts on a refusal reason had no data (not 0) until it happened.
    text = _scrape_fresh_server()
    for metric, (label, values) in LABELLED.items():
        for value in values:
            assert f'{metric}{{{label}="{value}"}} 0.0' in text, (metric, value)


def test_the_operator_guide_lists_exactly_the_label_values_exported() -> None:
    guide = OPERATIONS.read_text()
    for metric, (_, values) in LABELLED.items():
        if metric.startswith("dna_stun_relayed_bytes"):
            continue  # its row says "by direction" as the packets' row does
        row = next(line for line in guide.splitlines() if line.startswith(f"| `{metric}{{"))
        listed = re.findall(r"`([a-z_]+)`", row.split("|")[2])
        assert sorted(listed) == sorted(values), metric


def test_status_lists_the_warnings_logged_at_start() -> None:
    # The overlay nodes list them under `warnings` in /status; the relay only logged them
    # once, where an operator looking at /status later did not see them.
    config = StunServiceConfig.model_validate(
        {"server": {"udp_port": 0}, "ops": {"http_host": "127.0.0.1", "http_port": 0}}
    )

    warnings = status_once_started(lambda: StunServer(config))["warnings"]
    assert isinstance(warnings, list)
    assert any("every TURN request will be refused" in w for w in warnings), warnings
    assert any("other machines cannot reach it" in w for w in warnings), warnings
