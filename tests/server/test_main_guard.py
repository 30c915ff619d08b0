"""A script that creates a worker pool without the ``__main__`` guard gets one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

UNGUARDED = """\
print("top of script")
from server.pool import WorkerPool
from server.config import PoolConfig
from server.types import ScoreItem

with WorkerPool(PoolConfig(workers=1)) as pool:
    print(pool.score([ScoreItem("a", "so \\\\boxed{4}", ("4",))])[0].status)
"""


def _run(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unguarded_script_gets_one_message_naming_the_guard(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    proc = _run([str(script)], tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("server.worker.MainModuleError:"), proc.stderr[-2000:]
    assert 'if __name__ == "__main__":' in last and 'verifier="host:port"' in last
    assert str(script) in last
    # multiprocessing's own bootstrapping traceback is not shown (the worker exits quietly)
    assert "bootstrapping phase" not in proc.stderr


def test_guarded_script_works(tmp_path):
    body = "".join("    " + line + "\n" for line in UNGUARDED.splitlines())
    script = tmp_path / "guarded.py"
    script.write_text('if __name__ == "__main__":\n' + body)
    proc = _run([str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["top", "of", "script", "Status.OK"]


def test_script_from_stdin_fails_before_starting_workers(tmp_path):
    guarded = 'if __name__ == "__main__":\n' + "".join(
        "    " + line + "\n" for line in UNGUARDED.splitlines()
    )
    proc = _run(["-"], tmp_path, stdin=guarded)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("server.worker.MainModuleError:"), proc.stderr[-2000:]
    assert "standard input" in last and "FileNotFoundError" not in proc.stderr
