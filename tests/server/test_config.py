"""Config validation and the command line: bad values are refused with the field's name."""

from __future__ import annotations

import pytest

from server.__main__ import config_from_args
from server.config import Limits, PoolConfig, ServerConfig, VerifierConfig


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: PoolConfig(workers=0), "pool.workers"),
        (lambda: PoolConfig(default_deadline_s=10, max_deadline_s=5), "default_deadline_s"),
        (lambda: PoolConfig(slow_after_s=float("nan")), "slow_after_s"),
        (lambda: PoolConfig(memory_limit_mb=10), "memory_limit_mb"),
        (lambda: Limits(max_nesting=0), "limits.max_nesting"),
        (lambda: VerifierConfig(recheck_rel_tol=2.0), "recheck_rel_tol"),
        (lambda: ServerConfig(port=70000), "server.port"),
        (lambda: ServerConfig(pool=PoolConfig(max_queue_items=10)), "max_batch_items"),
        (lambda: ServerConfig(log_level="LOUD"), "log_level"),
    ],
)
def test_invalid_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_cli_maps_flags_to_config(tmp_path, monkeypatch):
    monkeypatch.delenv("FIPO_REWARD_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("a-long-enough-token\n")
    cfg = config_from_args(
        [
            "--port",
            "0",
            "--workers",
            "3",
            "--deadline",
            "2.5",
            "--no-metrics",
            "--no-recheck",
            "--auth-token-file",
            str(token),
            "--max-batch",
            "100",
        ]
    )
    assert cfg.port == 0 and cfg.metrics_port is None and cfg.auth_token == "a-long-enough-token"
    assert cfg.pool.workers == 3 and cfg.pool.default_deadline_s == 2.5
    assert not cfg.pool.verifier.exact_numeric_recheck and cfg.pool.limits.max_batch_items == 100
    assert cfg.host == "127.0.0.1"


def test_cli_error_is_a_usage_message(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--workers", "0"])
    assert e.value.code == 2
    assert "pool.workers" in capsys.readouterr().err
