import socket
from pathlib import Path

import nats
import pytest
from nats.js import api as js_api

from taskframe import ConfigError
from taskframe._server import NatsServer


async def stored(url: str, stream: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


async def test_file_stored_messages_survive_stop_kill_and_restart_on_the_same_port(
    tmp_path: Path,
) -> None:
    server = NatsServer(port=-1, store_dir=tmp_path / "store")
    try:
        server.start()
        port = server.port
        assert port > 0
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name="KEEP", subjects=["keep.>"], storage=js_api.StorageType.FILE)
            for n in range(10):
                await js.publish(f"keep.{n}", b"x" * n)
        finally:
            await nc.close()

        server.stop()
        assert not server.running
        assert server.process is None
        server.start()
        assert server.port == port
        assert await stored(server.url, "KEEP") == 10

        server.kill()
        assert not server.running
        server.start()
        assert server.port == port
        assert await stored(server.url, "KEEP") == 10
    finally:
        server.stop()
    server.stop()  # stopping a stopped server is a no-op
    assert not server.running


def test_repr_shows_url_and_pid_while_running(tmp_path: Path) -> None:
    server = NatsServer(port=-1, store_dir=tmp_path)
    assert repr(server) == "<NatsServer nats://127.0.0.1:-1 stopped>"
    with server:
        assert server.process is not None
        pid = server.process.pid
        assert repr(server) == f"<NatsServer nats://127.0.0.1:{server.port} pid={pid}>"
        assert server.url == f"nats://127.0.0.1:{server.port}"
    assert repr(server) == f"<NatsServer nats://127.0.0.1:{server.port} stopped>"


def test_the_server_listens_on_loopback_only(tmp_path: Path) -> None:
    with NatsServer(port=-1, store_dir=tmp_path) as server:
        command = server.command()
        assert command[command.index("-a") + 1] == "127.0.0.1"
        assert any(f"connections on 127.0.0.1:{server.port}" in line for line in server.log)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            assert conn.recv(4).startswith(b"INFO")


def test_a_bad_config_file_is_a_config_error_with_the_servers_own_words(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("listen: [[[\n")
    server = NatsServer(port=-1, store_dir=tmp_path / "store", config=conf)
    try:
        with pytest.raises(ConfigError, match="nats-server did not start") as failed:
            server.start()
        assert "Parse error" in str(failed.value)
        assert not server.running
    finally:
        server.stop()


def test_an_unknown_config_field_names_the_field(tmp_path: Path) -> None:
    conf = tmp_path / "typo.conf"
    conf.write_text("max_payloadd: 1MB\n")
    server = NatsServer(port=-1, store_dir=tmp_path / "store", config=conf)
    try:
        with pytest.raises(ConfigError, match='unknown field "max_payloadd"'):
            server.start()
        assert not server.running
    finally:
        server.stop()


def test_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with NatsServer(port=-1, store_dir=tmp_path / "a") as first:
        second = NatsServer(port=first.port, store_dir=tmp_path / "b")
        try:
            with pytest.raises(ConfigError, match="address already in use"):
                second.start()
            assert not second.running
        finally:
            second.stop()
        assert first.running
