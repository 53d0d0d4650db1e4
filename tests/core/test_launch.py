"""dna_core.launch: Ctrl-C while a console script loads or runs exits 130, no traceback."""

from __future__ import annotations

import sys
import types

import pytest
from dna_core.launch import launch
from support import ctrl_c_in_a_weakref_callback


def ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("main", [ctrl_c, ctrl_c_in_a_weakref_callback])
def test_ctrl_c_is_a_quiet_exit_130(
    main: types.FunctionType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    command = types.ModuleType("a_command")
    command.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "a_command", command)
    with pytest.raises(SystemExit) as exit_:
        launch("a_command")
    assert exit_.value.code == 130
    assert "Traceback" not in capsys.readouterr().err
