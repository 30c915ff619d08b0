"""The interim main job: `python -m server.demo` scores its sample and prints every status."""

from __future__ import annotations

from server import demo


def test_demo_prints_a_row_per_item(capsys):
    assert demo.main(["--workers", "1"]) == 0
    out = capsys.readouterr().out
    for status in ("OK", "WRONG", "NO_ANSWER", "INPUT_TOO_LARGE", "INVALID", "GOLD_UNPARSABLE"):
        assert f" {status} " in out, status
    assert "exact_recheck_overturned" in out
    assert f"{len(demo.SAMPLE)} items scored" in out
