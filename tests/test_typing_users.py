"""A user's ``mypy --strict`` on code that uses the package, as a user runs it.

The package is copied as a wheel installs it (with its ``py.typed``, without this
project's ``typings/``) into a directory on the ``PYTHONPATH`` of a mypy
subprocess, which runs in a project of its own: ``tests/typing/user_app.py`` must
pass, and every line of ``tests/typing/user_errors.py`` marked ``# error`` must be
reported (and no other), which proves that the package's types reach the user's
code rather than ``Any``. The mypy configuration is the one the README gives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flask_restful_async

HERE = Path(__file__).resolve().parent / "typing"
PACKAGE = Path(flask_restful_async.__file__).resolve().parent


def test_user_code_passes_mypy_strict_with_the_packages_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    assert (site / PACKAGE.name / "py.typed").exists()
    project = tmp_path / "project"
    project.mkdir()
    for name in ("mypy.ini", "user_app.py", "user_errors.py"):
        shutil.copy(HERE / name, project / name)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MYPYPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-error-summary",
            "user_app.py",
            "user_errors.py",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    reported: dict[str, set[int]] = {}
    for match in re.finditer(r"^([\w./-]+):(\d+): error:", result.stdout, re.MULTILINE):
        reported.setdefault(match[1], set()).add(int(match[2]))
    marked = {
        number
        for number, line in enumerate((HERE / "user_errors.py").read_text().splitlines(), 1)
        if line.rstrip().endswith("# error")
    }
    assert marked
    assert reported == {"user_errors.py": marked}, result.stdout
