"""No file in the repository holds an unresolved merge conflict.

A conflict inside a skipped docs snippet once went unnoticed: nothing ran that block, so
nothing failed. This test reads every tracked text file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)


def test_no_conflict_markers_in_tracked_files() -> None:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    bad = []
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (figures, wheels)
        for match in MARKER.finditer(text):
            bad.append(f"{name}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not bad, f"unresolved merge conflict markers: {bad}"
