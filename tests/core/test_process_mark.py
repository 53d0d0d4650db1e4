"""The ``process`` mark (tests/process_mark.py): set from the fixtures a test uses, and
enforced, so `make check` (``-m "not process"``) never starts a process."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess

import pytest
from process_mark import no_new_children, starts_processes


@pytest.fixture
@starts_processes
def tagged() -> str:
    return "starts nothing itself: the tag alone marks the tests that use it"


@pytest.fixture
def through_another(tagged: str) -> str:
    return tagged


def test_a_test_using_a_tagged_fixture_is_marked(
    tagged: str, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("process") is not None


def test_so_is_one_using_it_through_another_fixture(
    through_another: str, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("process") is not None


def test_an_unmarked_test_may_not_start_a_process(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("process") is None
    refused = pytest.raises(pytest.fail.Exception, match="is not marked `process`")
    with refused:
        subprocess.run(["true"], check=False)
    with refused:
        os.system("true")

    async def spawn() -> None:
        await asyncio.create_subprocess_exec("true")

    with refused:
        asyncio.run(spawn())


@pytest.mark.process
def test_a_marked_test_may() -> None:
    assert subprocess.run(["true"], check=False).returncode == 0


@pytest.mark.process  # it starts one, to see it noticed
def test_a_process_started_by_native_code_is_noticed_afterwards() -> None:
    libc = ctypes.CDLL(None)  # system(3) forks in C: no Python spawner is called
    with (
        pytest.raises(pytest.fail.Exception, match="from native code"),
        no_new_children("a test"),
    ):
        assert libc.system(b"true") == 0
    with no_new_children("a test"):  # and nothing is reported when nothing was started
        pass
