"""The committed generated code must match what `python -m server.codegen` produces now."""

from __future__ import annotations

from pathlib import Path

from server import codegen


def test_generated_code_is_fresh(tmp_path: Path):
    fresh = tmp_path / "gen"
    files = codegen.generate(fresh)
    assert Path("fipo/v1/reward_pb2.py") in files
    stale = [
        str(f)
        for f in files
        if not (codegen.DEFAULT_OUT / f).is_file()
        or (codegen.DEFAULT_OUT / f).read_bytes() != (fresh / f).read_bytes()
    ]
    committed = {
        p.relative_to(codegen.DEFAULT_OUT)
        for p in codegen.DEFAULT_OUT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    extra = sorted(str(p) for p in committed - set(files))
    assert not stale and not extra, (
        f"server/gen is stale (changed: {stale}, not generated: {extra}); run `make proto`"
    )


def test_generated_imports_are_relative():
    text = (codegen.DEFAULT_OUT / "fipo/v1/reward_pb2_grpc.py").read_text()
    assert "from fipo.v1" not in text and "from . import reward_pb2" in text
