"""Settings from PACSAI_* variables: defaults that work, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsai.errors import ConfigError
from pacsai.settings import Peer, Settings


def test_defaults_work_on_one_machine(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path)})
    assert settings.node.port == 11112 and settings.node.ae_title == "PACSAI"
    assert settings.queue.broker_url == "" and settings.node.quiet_period_s == 10.0
    assert settings.node.routes_file.is_file() and settings.worker.models_dir.is_dir()
    assert settings.storage.spool_dir == tmp_path / "spool"
    assert settings.storage.spool_reserve_bytes == 1024 * 1024 * 1024  # PACSAI_SPOOL_RESERVE_MB's default, 1024


def test_the_spool_reserve_is_given_in_megabytes(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_SPOOL_RESERVE_MB": "64"})
    assert settings.storage.spool_reserve_bytes == 64 * 1024 * 1024


def test_peers_and_callers(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "ORTHANC@10.0.0.5:4242, B@h:1"})
    assert settings.delivery.peers == (Peer("ORTHANC", "10.0.0.5", 4242), Peer("B", "h", 1))
    assert settings.callers == ("ORTHANC", "B")
    assert settings.delivery.peer("B") == Peer("B", "h", 1) and settings.delivery.peer("X") is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PACSAI_PORT", "70000"),
        ("PACSAI_PORT", "eleven"),
        ("PACSAI_PEERS", "ORTHANC@host"),
        ("PACSAI_PEERS", "A\\B@h:1"),
        ("PACSAI_AE_TITLE", "THIS-AE-TITLE-IS-TOO-LONG"),
        ("PACSAI_QUIET_PERIOD_S", "0"),
        ("PACSAI_ALLOW_ANY_CALLER", "maybe"),
        ("PACSAI_DEVICE", "tpu"),
        ("PACSAI_ROUTES_FILE", "/nonexistent.yaml"),
        ("PACSAI_LOG_LEVEL", "loud"),
        ("PACSAI_SPOOL_RESERVE_MB", "-1"),
    ],
)
def test_a_wrong_value_names_its_variable(variable: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), variable: value})


def test_log_key_is_made_once_and_kept(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path)})
    first, second = settings.with_log_key(), settings.with_log_key()
    assert first.log_key and first.log_key == second.log_key
    assert (tmp_path / "log.key").stat().st_mode & 0o077 == 0
    assert first.log_key.decode() not in repr(first)


def test_a_delivery_back_off_past_the_visibility_timeout_is_refused() -> None:
    env = {
        "PACSAI_BROKER_URL": "redis://127.0.0.1:6379/0",
        "PACSAI_VISIBILITY_TIMEOUT_S": "300",
        "PACSAI_SEND_BACKOFF_MAX_S": "600",
    }
    with pytest.raises(ConfigError, match="PACSAI_SEND_BACKOFF_MAX_S .* must be below PACSAI_VISIBILITY_TIMEOUT_S"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "PACSAI_SEND_BACKOFF_MAX_S": "120"}).queue.visibility_timeout_s == 300
    default = Settings.from_env({"PACSAI_TASK_TIME_LIMIT_S": "100"})
    assert (default.queue.visibility_timeout_s, default.queue.retry_delay_s) == (800, 10)


def test_ae_titles_may_have_sixteen_characters_but_not_seventeen() -> None:
    assert Settings.from_env({"PACSAI_AE_TITLE": "A" * 16}).node.ae_title == "A" * 16  # PS3.5: AE is 16 bytes max
    with pytest.raises(ConfigError, match="PACSAI_AE_TITLE"):
        Settings.from_env({"PACSAI_AE_TITLE": "A" * 17})
