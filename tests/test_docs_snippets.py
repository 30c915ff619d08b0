"""Every ```python block of README.md and docs/*.md runs as a script, as a new user would.

Each block is written to a file in a temp dir and run with this interpreter (the repository
on ``PYTHONPATH``, a timeout). A block is skipped only when the line right before its fence
is ``<!-- snippet: skip (reason) -->``; blocks that train or start vLLM carry one, and the
skip reason shows in the test report. Snippets that need a reward server start their own on
a free port (``create_server(ServerConfig(port=0))``), so no outside service is assumed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- snippet: skip \((?P<reason>[^)]+)\) -->$")
TIMEOUT_S = 180


def _snippets() -> list:
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                code = "\n".join(lines[start:end]) + "\n"
                skip = SKIP.match(lines[i - 1].strip()) if i else None
                marks = [pytest.mark.skip(reason=skip["reason"])] if skip else []
                ident = f"{doc.relative_to(REPO)}:{i + 1}"
                out.append(pytest.param(code, id=ident, marks=marks))
                i = end
            i += 1
    return out


SNIPPETS = _snippets()


def test_the_docs_have_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs_as_a_script(code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
