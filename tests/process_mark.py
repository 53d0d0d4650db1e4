"""The ``process`` mark: which tests start a process, kept true without a hand-kept list.

`make check` runs the tests that start no process (``-m "not process"``), so the mark
decides what the fast loop covers. It comes from where processes are started:

* a fixture that starts processes is tagged ``@starts_processes`` (under ``@pytest.fixture``),
  and every test that uses it, directly or through other fixtures, is marked at collection
  (tests/conftest.py, `mark_process_tests`);
* a test that starts one itself carries ``@pytest.mark.process`` (or its module's
  ``pytestmark``).

A test that starts a process without the mark fails (`guard`): ``subprocess``, ``os.fork``,
``os.posix_spawn`` and the like refuse, with a message saying what to mark; and a process
started by native code (protoc runs its plugins so) is seen afterwards, as a child this
process reaped or still has (`watch`). So a new test cannot slip a process into
`make check`, and the mark never claims less than the truth.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])
_TAG = "starts_processes"


def starts_processes(fixture: F) -> F:
    """Tag a fixture function that starts processes (apply below ``@pytest.fixture``)."""
    setattr(fixture, _TAG, True)
    return fixture


def uses_process_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses a tagged fixture, directly or through other fixtures."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's resolved fixture closure
    if info is None:
        return False
    return any(
        getattr(definition.func, _TAG, False)
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


def mark_process_tests(items: list[pytest.Item]) -> None:
    for item in items:
        if uses_process_fixture(item):
            item.add_marker(pytest.mark.process)


# --- the guard ---------------------------------------------------------------------------

# Every way our code and its libraries start a process: subprocess (asyncio's subprocesses
# included) through Popen._execute_child, multiprocessing through fork or fork_exec, pty
# through forkpty.
_SPAWNERS: list[tuple[Any, str]] = [
    (subprocess.Popen, "_execute_child"),
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
    (_posixsubprocess, "fork_exec"),
]
_unmarked: list[str] = []  # the node ID of the running test while it may start none


def install() -> None:
    """Wrap every spawner once per session; a wrapper refuses while a test is unmarked."""
    for owner, name in _SPAWNERS:
        setattr(owner, name, _refusing(getattr(owner, name), name))


@contextlib.contextmanager
def guard(item: pytest.Item) -> Iterator[None]:
    """Around a test's setup, call and teardown: refuse spawns unless it is marked."""
    if item.get_closest_marker("process"):
        yield
        return
    _unmarked.append(item.nodeid)
    try:
        yield
    finally:
        _unmarked.pop()


@contextlib.contextmanager
def watch(item: pytest.Item) -> Iterator[None]:
    """Around an unmarked test's setup or call: fail it if it started a process the
    spawners did not see. (Not around teardown: tearing down a session fixture, such as
    the redis-server, reaps a child during whichever test happens to run last.)"""
    if item.get_closest_marker("process"):
        yield
        return
    with no_new_children(item.nodeid):
        yield


@contextlib.contextmanager
def no_new_children(nodeid: str) -> Iterator[None]:
    before = _children_seen()
    yield
    if _children_seen() != before:
        pytest.fail(
            f"{nodeid} started a process (from native code: a child was reaped or is "
            "still running) but is not marked `process`: mark it @pytest.mark.process",
            pytrace=False,
        )


def _children_seen() -> tuple[object, ...]:
    """What changes whenever this process gains a child: the resource use of the children
    it reaped (a reaped process adds page faults at least) and the ones still running."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    running: list[int] = []
    for task in Path("/proc/self/task").iterdir():  # children are listed per thread
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            running += map(int, (task / "children").read_text().split())
    return (reaped.ru_minflt, reaped.ru_utime, reaped.ru_stime, sorted(running))


def _refusing(spawn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def refusing(*args: Any, **kwargs: Any) -> Any:
        if _unmarked:
            pytest.fail(
                f"{_unmarked[-1]} started a process ({name}) but is not marked `process`: "
                "mark the test @pytest.mark.process, or tag the fixture that starts it "
                "@starts_processes (tests/process_mark.py); `make check` runs only tests "
                "that start none",
                pytrace=False,
            )
        return spawn(*args, **kwargs)

    return refusing
