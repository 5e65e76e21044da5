"""Every example of the README runs as shown: its Python blocks and `polyak` commands.

The blocks run in order in one temporary directory, as a reader would run them. A
Python block whose first line is ``# file: NAME`` is a file the reader saves (a model
factory, say): it is written to NAME, not run. `make` commands are the set-up itself
and are exercised by CI.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_examples():
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds.count("python") >= 3 and "bash" in kinds


def test_readme_examples_run_as_shown(tmp_path):
    environment = dict(os.environ, KERAS_BACKEND="torch")
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    for kind, body in readme_blocks():
        first_line = body.splitlines()[0] if body else ""
        if kind == "python" and first_line.startswith("# file: "):
            (tmp_path / first_line.removeprefix("# file: ").strip()).write_text(body)
            continue
        if kind == "python":
            commands = [[sys.executable, "-c", body]]
        else:
            lines = [line.split("#")[0].strip() for line in body.splitlines()]
            commands = [shlex.split(line) for line in lines if line.startswith("polyak ")]
        for command in commands:
            completed = subprocess.run(
                command, cwd=tmp_path, env=environment, capture_output=True, text=True, check=False
            )
            shown = body if kind == "python" else " ".join(command)
            if completed.returncode != 0:
                pytest.fail(f"README example failed:\n{shown}\n{completed.stderr[-2000:]}")
