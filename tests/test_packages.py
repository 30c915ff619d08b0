"""``server`` and ``trainer`` are generic top-level names: no other distribution's may shadow ours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run away from the checkout, so the installed packages are what Python finds.
_WHERE = """
import importlib, sys
for name in ("fipo_env", "server", "trainer"):
    try:
        print(importlib.import_module(name).__file__)
    except ImportError:
        print("-")
"""


def test_installed_server_and_trainer_are_fipos(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", _WHERE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    fipo_env, server, trainer = out.stdout.split()
    if fipo_env == "-":
        pytest.skip("fipo is not installed in this environment (tests run from the checkout)")
    root = Path(fipo_env).parents[1]
    for name, path in (("server", server), ("trainer", trainer)):
        assert path != "-" and Path(path).parents[1] == root, (
            f"`import {name}` finds {path}, not fipo's beside {root}: another distribution's "
            f"{name!r} package shadows fipo's; install fipo in its own virtual environment"
        )
        assert (Path(path).parent / "__init__.py").read_text().startswith('"""fipo'), path
