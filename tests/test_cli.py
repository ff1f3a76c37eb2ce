"""The command line: ``python -m qwen_magic prepare-demo | run-notebook | chat``."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest

from qwen_magic.__main__ import main


@pytest.mark.demo
def test_prepare_demo_reports_the_ready_folder(demo_path, capsys):
    """prepare-demo on a cached model says where it is, without rebuilding."""
    assert main(["prepare-demo"]) == 0
    assert str(demo_path) in capsys.readouterr().out


@pytest.mark.kernel
def test_run_notebook_prints_each_question_and_reply(tiny_model_path, tmp_path, capsys):
    """run-notebook executes a notebook in a real kernel and prints the %%qwen exchange."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("%load_ext qwen_magic"),
        nbformat.v4.new_code_cell(f"%qwen_load {tiny_model_path} --device cpu --quiet"),
        nbformat.v4.new_code_cell("%%qwen -n 5 --greedy\nSay hello."),
    ]
    source = tmp_path / "chat.ipynb"
    nbformat.write(notebook, source)
    out = tmp_path / "executed.ipynb"
    assert main(["run-notebook", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ">>> Say hello." in printed
    assert re.search(r"\n\[5 tokens · .* tokens/s( · [^\]]+)?\]\n", printed)  # the footer line
    executed = nbformat.read(out, as_version=4)
    assert executed.cells[2].outputs  # the reply was saved with the notebook


def test_usage_errors_are_one_line_without_traceback(tmp_path):
    """A mistake on the command line ends with one 'error:' line, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "qwen_magic", "chat", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        input="",
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: No such file or folder")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_unknown_commands_show_usage(argv, capsys):
    """No command or an unknown one exits with argparse's usage message."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err
