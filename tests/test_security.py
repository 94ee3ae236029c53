"""The production configuration in deploy/secure/: users per role, TLS, and clear refusals.

A real nats-server runs deploy/secure/nats.conf with a throwaway CA made by the `openssl`
command line. Each forbidden operation is shown refused twice: by the server (its log names
the violation) and by taskframe (a `PermissionDeniedError` that names the remedy).
"""

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from taskframe import (
    App,
    Client,
    ConnectError,
    Context,
    PermissionDeniedError,
    Task,
    chain,
    chord,
    connect,
    group,
    provision,
)
from taskframe._connection import explain
from taskframe._publish import publish_stored
from taskframe._server import server_binary
from taskframe._topology import queue_stream
from taskframe.testing import NatsServer, eventually, running_worker
from tests.test_batched_records import Replies

SECURE = Path(__file__).parent.parent / "deploy" / "secure"
NS = "shop"  # the namespace deploy/secure/accounts.conf is written for
PASSWORDS = {"producer": "pr0ducer-S3cret", "worker": "w0rker-S3cret", "admin": "adm1n-S3cret"}
FAST = 2.0  # seconds: a refusal is reported at once, not after the publish retries


class Double(Task[int], queue="math"):
    n: int


class Fresh(Task[None], queue="fresh"):
    """A queue nobody provisioned."""


def build_app() -> App:
    app = App(NS)

    @app.handle(Double)
    async def double(job: Double, ctx: Context) -> int:
        return job.n * 2

    return app


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(pki: Path, name: str, ca: str, extensions: str) -> None:
    key, csr, ext = pki / f"{name}.key", pki / f"{name}.csr", pki / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki / f"{ca}.pem"),
        "-CAkey", str(pki / f"{ca}.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(ext), "-out", str(pki / f"{name}.pem"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "1", "-subj", "/CN=taskframe test CA",
        "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.pem"),
    )  # fmt: skip
    _issue(
        pki,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    _issue(pki, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return pki


def _server_env(pki: Path) -> dict[str, str]:
    return {
        "TF_TLS_CERT": str(pki / "server.pem"),
        "TF_TLS_KEY": str(pki / "server.key"),
        "TF_TLS_CA": str(pki / "ca.pem"),
        **{f"TF_{role.upper()}_PASSWORD": pw for role, pw in PASSWORDS.items()},
    }


@pytest.fixture(scope="module")
def server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """nats-server with deploy/secure/nats.conf (passwords and TLS files from its env)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in _server_env(pki).items():
            env.setenv(name, value)
        store = tmp_path_factory.mktemp("secure-store")
        with NatsServer(port=-1, store_dir=store, config=SECURE / "nats.conf") as nats:
            yield nats


def _tls(pki: Path) -> dict[str, str]:
    return {
        "tls_ca": str(pki / "ca.pem"),
        "tls_cert": str(pki / "client.pem"),
        "tls_key": str(pki / "client.key"),
    }


def _as(server: NatsServer, pki: Path, role: str, namespace: str = NS) -> Client:
    """A client logged in as `role`, credentials in the URL."""
    url = f"nats://{role}:{PASSWORDS[role]}@127.0.0.1:{server.port}"
    return connect(url, namespace=namespace, inbox_prefix=f"_INBOX_{role}", **_tls(pki))


@pytest.fixture(scope="module")
def provisioned(server: NatsServer, pki: Path) -> None:
    """The admin has run `taskframe provision` for the app (as a deploy does first)."""

    async def provision_app() -> None:
        async with _as(server, pki, "admin") as admin:
            await provision(build_app(), admin)

    asyncio.run(provision_app())


@pytest.fixture
async def producer(server: NatsServer, pki: Path, provisioned: None) -> AsyncIterator[Client]:
    async with _as(server, pki, "producer") as client:
        yield client


@pytest.fixture
async def worker(
    server: NatsServer, pki: Path, provisioned: None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Client]:
    """A worker client with its credentials and TLS files from the environment."""
    monkeypatch.setenv("TASKFRAME_USER", "worker")
    monkeypatch.setenv("TASKFRAME_PASSWORD", PASSWORDS["worker"])
    monkeypatch.setenv("TASKFRAME_INBOX_PREFIX", "_INBOX_worker")
    for name, value in _tls(pki).items():
        monkeypatch.setenv(f"TASKFRAME_{name.upper()}", value)
    async with connect(server.url, namespace=NS) as client:
        yield client


async def refused_by_server(server: NatsServer, kind: str, subject: str) -> None:
    """Wait for the server to log a violation of `kind` ("Publish"/"Subscription") on `subject`."""
    violation = f'{kind} Violation - Subject "{subject}"'
    await eventually(
        lambda: any(violation in line for line in server.log),
        f"the server to log: {violation}",
        timeout=2,
    )


# Allowed: each role does its part end to end.


async def test_admin_provisions_producer_enqueues_and_worker_processes(
    server: NatsServer,
    pki: Path,
    producer: Client,
    worker: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("TASKFRAME_")]:
        monkeypatch.delenv(name)  # the worker's settings, not the admin's
    run = await producer.enqueue(Double(n=21))
    async with running_worker(build_app(), worker) as running, _as(server, pki, "admin") as admin:
        assert await run.result(timeout=10) == 42
        assert [w.id for w in await admin.workers()] == [running.id]  # it wrote its record
    assert (await producer.handle(Double, run.id).status()).result == 42


# Forbidden for a producer.


async def test_a_producer_cannot_create_streams(server: NatsServer, producer: Client) -> None:
    started = time.monotonic()
    with pytest.raises(PermissionDeniedError) as caught:
        await producer.enqueue(Fresh())
    assert time.monotonic() - started < FAST
    assert caught.value.operation == f"create stream TF_{NS}_fresh"
    assert "run `taskframe provision` with an admin user first" in str(caught.value)
    await refused_by_server(server, "Publish", f"$JS.API.STREAM.CREATE.TF_{NS}_fresh")


async def test_a_producer_cannot_consume(server: NatsServer, producer: Client) -> None:
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{queue_stream(NS, 'math')}.workers"
    started = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="run workers with a worker user") as caught:
        await producer.nc.request(pull, b'{"batch": 1}', timeout=10)
    assert time.monotonic() - started < FAST
    assert caught.value.operation == f"consume from stream TF_{NS}_math"
    await refused_by_server(server, "Publish", pull)
    with pytest.raises(PermissionDeniedError, match="use a worker or admin user"):
        async with running_worker(build_app(), producer):
            pass


async def test_a_producer_cannot_purge_delete_or_forge_results(
    server: NatsServer, producer: Client
) -> None:
    stream = queue_stream(NS, "math")
    with pytest.raises(PermissionDeniedError, match="only an admin user may purge") as purge:
        await producer.js.purge_stream(stream)
    assert purge.value.operation == f"purge stream {stream}"
    with pytest.raises(PermissionDeniedError, match="only an admin user may delete") as delete:
        await producer.js.delete_stream(stream)
    assert delete.value.operation == f"delete stream {stream}"
    await refused_by_server(server, "Publish", f"$JS.API.STREAM.PURGE.{stream}")
    await refused_by_server(server, "Publish", f"$JS.API.STREAM.DELETE.{stream}")
    result = f"$KV.TF_{NS}_results.forged"
    with pytest.raises(PermissionDeniedError, match="only workers may write task status"):
        await publish_stored(producer.nc, producer.settings, result, b"{}")
    await refused_by_server(server, "Publish", result)
    assert (await producer.js.stream_info(stream)).config.name == stream


async def test_a_producer_cannot_read_a_workers_inbox(server: NatsServer, producer: Client) -> None:
    await producer.nc.subscribe("_INBOX_worker.>")
    await producer.nc.flush()
    await refused_by_server(server, "Subscription", "_INBOX_worker.>")


# Forbidden for a worker.


async def test_a_worker_cannot_purge_delete_or_create_streams(
    server: NatsServer, worker: Client
) -> None:
    stream = queue_stream(NS, "math")
    with pytest.raises(PermissionDeniedError, match="only an admin user may purge"):
        await worker.js.purge_stream(stream, subject=f"{NS}.sched.math.cron.nightly")
    with pytest.raises(PermissionDeniedError, match="only an admin user may delete"):
        await worker.js.delete_stream(stream)
    await refused_by_server(server, "Publish", f"$JS.API.STREAM.PURGE.{stream}")
    await refused_by_server(server, "Publish", f"$JS.API.STREAM.DELETE.{stream}")
    app = build_app()

    @app.handle(Fresh)
    async def fresh(job: Fresh, ctx: Context) -> None:
        return None

    started = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="taskframe provision") as caught:
        async with running_worker(app, worker, queues=["fresh"]):
            pass
    assert time.monotonic() - started < FAST
    assert caught.value.operation == f"create stream TF_{NS}_fresh"


async def test_a_worker_cannot_publish_to_another_namespace(server: NatsServer, pki: Path) -> None:
    async with _as(server, pki, "worker", namespace="other") as elsewhere:
        with pytest.raises(PermissionDeniedError, match="'other'") as caught:
            await publish_stored(elsewhere.nc, elsewhere.settings, "other.tasks.math.Double", b"{}")
        assert caught.value.operation == "publish to other.tasks.math.Double"
    await refused_by_server(server, "Publish", "other.tasks.math.Double")


# Logging in.


async def test_a_wrong_password_is_a_clear_connect_error(server: NatsServer, pki: Path) -> None:
    url = f"nats://producer:not-the-password@127.0.0.1:{server.port}"
    started = time.monotonic()
    with pytest.raises(ConnectError, match="rejected the credentials") as caught:
        async with connect(url, namespace=NS, inbox_prefix="_INBOX_producer", **_tls(pki)):
            pass
    assert time.monotonic() - started < FAST
    assert "not-the-password" not in str(caught.value)


async def test_tls_needs_the_ca_and_a_client_certificate(server: NatsServer, pki: Path) -> None:
    url = f"nats://producer:{PASSWORDS['producer']}@127.0.0.1:{server.port}"
    with pytest.raises(ConnectError, match=r"not trusted.*set tls_ca"):
        async with connect(url, namespace=NS):
            pass
    with pytest.raises(ConnectError, match="requires a client certificate"):
        async with connect(url, namespace=NS, tls_ca=str(pki / "ca.pem")):
            pass
    async with connect(url, namespace=NS, inbox_prefix="_INBOX_producer", **_tls(pki)) as ok:
        assert ok.nc.is_connected


async def test_the_wrong_inbox_prefix_is_reported_at_connect(server: NatsServer, pki: Path) -> None:
    url = f"nats://worker:{PASSWORDS['worker']}@127.0.0.1:{server.port}"
    with pytest.raises(PermissionDeniedError, match="set inbox_prefix"):
        async with connect(url, namespace=NS, **_tls(pki)):
            pass


async def test_credentials_never_appear_in_logs_or_reprs(
    server: NatsServer, pki: Path, provisioned: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = PASSWORDS["producer"]
    wrong = f"nats://producer:{secret}-typo@127.0.0.1:{server.port}"
    with pytest.raises(ConnectError) as caught:
        async with connect(wrong, namespace=NS, **_tls(pki)):
            pass
    assert secret not in str(caught.value)
    producer = _as(server, pki, "producer")
    async with producer, _as(server, pki, "worker") as worker:
        run = await producer.enqueue(Double(n=2))
        async with running_worker(build_app(), worker):
            assert await run.result(timeout=10) == 4
        with pytest.raises(PermissionDeniedError) as denied:
            await producer.js.delete_stream(queue_stream(NS, "math"))
        for text in (repr(producer), repr(producer.settings), str(producer.settings), str(denied)):
            assert secret not in text
        token = connect(server.url, namespace=NS, user="u", password=secret, token=secret)
        assert secret not in repr(token.settings)
        assert "**********" in repr(token.settings)
    assert secret not in caplog.text
    assert "nats error" in caplog.text  # the failing connect was logged, without its secret


# The configuration files themselves.


@pytest.mark.parametrize("name", ["nats.conf", "cluster.conf"])
def test_the_deploy_configs_are_valid(name: str, pki: Path) -> None:
    env = {
        **os.environ,
        **_server_env(pki),
        "TF_SERVER_NAME": "tf-1",
        "TF_CLUSTER_LISTEN": "127.0.0.1:-1",
        "TF_ROUTES": '["nats-route://127.0.0.1:6222"]',
    }
    checked = subprocess.run(
        [server_binary(), "-c", str(SECURE / name), "-t"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_explanations_name_the_remedy() -> None:
    inbox = explain("subscribe", "_inbox.abc.*", "_INBOX")
    assert "set inbox_prefix" in str(inbox)
    ack = explain("publish", "$JS.ACK.TF_shop_math.workers.1.2.3.4.5")
    assert ack.operation == "acknowledge a delivered task"
    lanes = explain("publish", "$JS.API.CONSUMER.DELETE.TF_shop_math.workers-high")
    assert lanes.operation == "delete a consumer of stream TF_shop_math"


class Big(Task[int], queue="math"):
    """A body over the clients' offload threshold: it goes through the payloads bucket."""

    blob: str


class Sum(Task[int], queue="math"):
    """A chord's callback: reads its members' results on the worker."""


def build_big_app() -> App:
    app = build_app()

    @app.handle(Big)
    async def big(job: Big, ctx: Context) -> int:
        return len(job.blob)

    @app.handle(Sum)
    async def total(job: Sum, ctx: Context) -> int:
        return sum(await ctx.members(Double))

    return app


async def test_a_flow_and_a_large_task_run_under_the_producer_and_worker_roles(
    server: NatsServer, pki: Path, provisioned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("TASKFRAME_")]:
        monkeypatch.delenv(name)
    logged = set(server.log)  # the server's log so far (earlier tests' refusals)
    url = f"127.0.0.1:{server.port}"
    small = {"offload_over": 4096, **_tls(pki)}
    async with (
        connect(f"nats://producer:{PASSWORDS['producer']}@{url}", namespace=NS,
                inbox_prefix="_INBOX_producer", **small) as producer,
        connect(f"nats://worker:{PASSWORDS['worker']}@{url}", namespace=NS,
                inbox_prefix="_INBOX_worker", **small) as worker,
    ):  # fmt: skip
        big = await producer.enqueue(Big(blob="x" * 100_000))
        flow = await producer.enqueue(chain(Double(n=1), group(Double(n=2), Double(n=3))))
        summed = await producer.enqueue(chord(group(Double(n=4), Double(n=5)), then=Sum()))
        async with running_worker(build_big_app(), worker):
            assert await big.result(timeout=10) == 100_000
            assert await flow.result(timeout=10) == [4, 6]
            assert await summed.result(timeout=10) == 18
    assert [line for line in server.log if "Violation" in line and line not in logged] == []


async def test_a_busy_worker_batches_its_records_under_the_worker_role(
    server: NatsServer, pki: Path, provisioned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("TASKFRAME_")]:
        monkeypatch.delenv(name)
    logged = set(server.log)
    url = f"127.0.0.1:{server.port}"
    async with (
        connect(f"nats://producer:{PASSWORDS['producer']}@{url}", namespace=NS,
                inbox_prefix="_INBOX_producer", **_tls(pki)) as producer,
        connect(f"nats://worker:{PASSWORDS['worker']}@{url}", namespace=NS,
                inbox_prefix="_INBOX_worker", **_tls(pki)) as worker,
    ):  # fmt: skip
        replies = Replies(worker)
        runs = await producer.enqueue_many([Double(n=n) for n in range(600)])
        async with running_worker(build_app(), worker):
            assert [await run.result(timeout=10) for run in runs] == [2 * n for n in range(600)]
    assert replies.frames > 0  # its records went in batches, frames and end markers allowed
    assert [line for line in server.log if "Violation" in line and line not in logged] == []
