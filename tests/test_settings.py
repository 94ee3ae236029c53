"""Settings (taskframe.settings): defaults, TASKFRAME_* variables under arguments, clear
errors for bad values, and credentials that never show."""

import os
from pathlib import Path

import pytest

from taskframe import ConfigError, Settings, connect


@pytest.fixture(autouse=True)
def no_taskframe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the TASKFRAME_* variables it sets."""
    for name in list(os.environ):
        if name.startswith("TASKFRAME_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings.from_env()
    assert (settings.url, settings.namespace, settings.storage) == (
        "nats://127.0.0.1:4222",
        "default",
        "file",
    )
    assert (settings.ack_wait, settings.duplicate_window, settings.ping_interval) == (
        10.0,
        120.0,
        10.0,
    )
    assert (settings.publish_timeout, settings.publish_attempts, settings.replicas) == (5.0, 4, 1)
    assert (settings.results_max_bytes, settings.dead_max_bytes) == (-1, -1)
    assert settings.result_ttl == 86_400.0
    assert settings.connect_options() == {}


def test_variables_are_read_and_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_NAMESPACE", "shop")
    monkeypatch.setenv("TASKFRAME_ACK_WAIT", "2.5")
    monkeypatch.setenv("TASKFRAME_REPLICAS", "3")
    monkeypatch.setenv("TASKFRAME_STORAGE", "memory")
    monkeypatch.setenv("TASKFRAME_URL", "")  # empty: as if unset
    settings = Settings.from_env(ack_wait=1.0, url=None)  # None: not given
    assert (settings.namespace, settings.ack_wait, settings.replicas) == ("shop", 1.0, 3)
    assert (settings.storage, settings.url) == ("memory", "nats://127.0.0.1:4222")
    client = connect(["nats://a:4222", "nats://b:4222"], publish_attempts=2)
    assert client.settings.url == "nats://a:4222,nats://b:4222"
    assert client.settings.servers == ["nats://a:4222", "nats://b:4222"]
    assert (client.namespace, client.settings.publish_attempts) == ("shop", 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ack_wait": 0}, "ack_wait"),
        ({"replicas": 7}, "replicas"),
        ({"storage": "disk"}, "storage"),
        ({"publish_attempts": 0}, "publish_attempts"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"namespace": "my.app"}, "namespace"),
        ({"namespace": ""}, "namespace"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_setting(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(**values)


def test_a_bad_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_ACK_WAIT", "soon")
    with pytest.raises(ConfigError, match="ack_wait"):
        Settings.from_env()


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.ack_wait = 1.0  # type: ignore[misc]


def test_credentials_never_show() -> None:
    settings = Settings(
        url="nats://alice:s3cret@a:4222, tls://b:4222,nats://token@c:4222",
        password="pa55",
        token="t0ken",
        user="alice",
    )
    assert settings.servers == ["nats://alice:s3cret@a:4222", "tls://b:4222", "nats://token@c:4222"]
    assert settings.safe_url == "nats://a:4222,tls://b:4222,nats://c:4222"
    for shown in (repr(settings), str(settings)):
        assert "s3cret" not in shown
        assert "pa55" not in shown
        assert "t0ken" not in shown
        assert "nats://a:4222,tls://b:4222,nats://c:4222" in shown
    assert "**********" in repr(settings)
    options = settings.connect_options()
    assert (options["user"], options["password"], options["token"]) == ("alice", "pa55", "t0ken")


def test_connect_options_carry_credentials_files_and_the_inbox_prefix() -> None:
    settings = Settings(creds="/etc/nats/app.creds", inbox_prefix="_INBOX_worker")
    assert settings.connect_options() == {
        "user_credentials": "/etc/nats/app.creds",
        "inbox_prefix": "_INBOX_worker",
    }


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    """(TLS that works is tested end to end in test_security.py.)"""
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        Settings(tls_ca=str(tmp_path / "nope.pem")).connect_options()
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        Settings(tls_ca=str(garbage)).connect_options()
