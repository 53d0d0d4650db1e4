"""What an operator reads from a real `dna-storage-node` (issue 11 #11): role names, storage
figures in `/status`, and metrics named for what they measure."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from cluster import NodeProcess, free_ips, scrape, wait_ready
from process_mark import starts_processes

IP = free_ips(1)[0]


@pytest.fixture(scope="module")
@starts_processes
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        "storage", IP, tmp_path_factory.mktemp("operator"), [], command="dna-storage-node"
    )
    proc.start()
    try:
        wait_ready([proc])
        yield proc
    finally:
        proc.kill()


def test_role_is_a_name_in_status_and_logs(node: NodeProcess) -> None:
    assert node.status()["role"] == "storage"
    lines = [json.loads(line) for line in node.log_path.read_text().splitlines()]
    roles = {line["role"] for line in lines if line.get("logger") == "dna.node"}
    assert roles == {"storage"}


def test_status_has_storage_figures(node: NodeProcess) -> None:
    storage = node.status()["storage"]
    assert storage["backend"] == "sqlite"
    assert storage["mailboxes"] == storage["blobs"] == storage["bytes"] == 0
    disk = storage["disk"]
    assert 0 < disk["used_bytes"] < disk["total_bytes"]
    assert 0 < disk["used_fraction"] < 1 and disk["high_water"] == 0.9
    assert storage["refusing_writes"] is False


def test_metrics_are_named_for_what_they_measure(node: NodeProcess) -> None:
    names = {sample.name for sample in scrape(node)}
    assert not [n for n in names if n.endswith("_created")]
    assert "dna_storage_repair_last_pass_timestamp_seconds" in names
    assert "dna_storage_repair_last_pass_duration_seconds" in names
    assert "dna_storage_repair_lag_seconds" not in names
    assert "dna_storage_repair_last_pass" not in names
    for process in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert process in names
    assert "process_open_fds" in names
    build = [s for s in scrape(node) if s.name == "dna_build_info"]
    assert len(build) == 1 and build[0].value == 1
    assert build[0].labels["role"] == "storage" and build[0].labels["version"]
