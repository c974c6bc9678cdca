"""The lowrank-optim command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import lowrank_optim as lro
from lowrank_optim.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowrank-optim {lro.__version__}"


def test_help_without_a_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: lowrank-optim" in out and "list" in out


def test_list_names_every_preset_and_projector(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for key, cls in lro.PRESETS.items():
        assert key in out and cls.__name__ in out
    for name in lro.projectors.available():
        assert f"  {name} " in out
    lines = out.splitlines()
    # one column for every description, and every description whole: the first paragraph of each
    # docstring, wrapped, ends with its sentence
    starts = {re.match(r"  \S+(?: \S+)?\s{2,}", line).end() for line in lines if re.match(r"  \S", line)}
    assert len(starts) == 1, starts
    text = " ".join(line.strip() for line in lines)
    for cls in lro.PRESETS.values():
        summary = " ".join(x.strip() for x in cls.__doc__.strip().split("\n\n")[0].splitlines())
        assert summary in text, cls


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-everything"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("lowrank-optim") is None, reason="console script not installed (pip install -e .)")
def test_console_script_is_installed():
    out = subprocess.run(["lowrank-optim", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lowrank-optim {lro.__version__}"
    for module in ("lowrank_optim.cli", "lowrank_optim"):  # python -m, where the script is not on PATH
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
        assert "usage: lowrank-optim" in out.stdout, module


def test_stderr_lines_are_one_write_each(monkeypatch):
    """Ranks of a torchrun job share stderr: each message and its newline go out in one write, so two ranks'
    lines cannot run together (print() writes the newline separately)."""
    import io
    import sys

    from lowrank_optim._console import stderr_line

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, s):
            self.calls.append(s)
            return super().write(s)

    rec = Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    stderr_line("lowrank-optim pretrain: stopped by SIGTERM after step 2")
    assert rec.calls == ["lowrank-optim pretrain: stopped by SIGTERM after step 2\n"]
