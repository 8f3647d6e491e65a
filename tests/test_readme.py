"""The README's set-up commands and Python example are the ones that work.

The code blocks are read from README.md itself, so the README and these tests cannot
drift apart.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def setup_commands() -> list[str]:
    section = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in blocks("bash", section)]


def test_two_setup_commands_run_the_demo_and_the_suite():
    demo, tests = setup_commands()
    assert demo.endswith(".venv/bin/kvcache demo")
    assert tests.endswith(".venv/bin/python -m pytest -q")
    assert "'.[test]'" in tests


def test_setup_commands_need_no_activated_venv_and_no_python_alias():
    """Debian's system Python has no ``python`` and refuses ``pip install`` outside a
    virtualenv: each step is ``python3 -m venv`` or a program inside ``.venv``."""
    for command in setup_commands():
        assert "\n" not in command, "one line, so that it pastes as one command"
        for step in command.split("&&"):
            program = shlex.split(step)[0]
            assert program == "python3" or program.startswith(".venv/bin/"), step


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


@pytest.mark.slow
def test_python_example_runs_as_written_and_prints_what_it_says(tmp_path: Path):
    """Run the README's Python block in a fresh interpreter (twice: the second run finds
    the first's chunks on disk), and compare what each ``print`` writes with the comment
    beside it."""
    section = README.split("## From Python", 1)[1].split("\n## ", 1)[0]
    (code,) = blocks("python", section)
    expected = [
        line.split("#", 1)[1].strip()
        for line in code.splitlines()
        if line.startswith("print(") and "#" in line
    ]
    assert expected, "the example shows what it prints"
    # conftest points KVCACHE_DIR at tmp_path: the example's default store lands there.
    env = {**os.environ, "KVCACHE_DIR": str(tmp_path / "store")}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == expected
    assert (tmp_path / "store").is_dir()


@pytest.mark.slow
def test_blending_example_runs_as_written_and_prints_what_it_says():
    section = README.split("## Reuse documents anywhere in the prompt", 1)[1].split("\n## ", 1)[0]
    (code,) = blocks("python", section)
    expected = [line.split("#", 1)[1].strip() for line in code.splitlines()
                if line.startswith("print(") and "#" in line]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
