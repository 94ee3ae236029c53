"""The web dashboard in a real browser: Debian's chromium, driven by playwright.

The dashboard runs in the test's event loop (uvicorn on a free loopback port) on the
test's client. Every test shares one headless browser, so they share the module's loop.
Set TASKFRAME_DASHBOARD_SHOTS=docs/dashboard to save a screenshot of each page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import uvicorn
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect
from starlette.applications import Starlette
from starlette.routing import Mount

from taskframe import App, Client, Context, Event, FlowRun, Task, chain, connect
from taskframe._dashboard_rates import WINDOW, Rates
from taskframe.dashboard import create_app
from taskframe.provision import provision
from taskframe.testing import NatsServer, _delete_streams, eventually, running_worker

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
HAVE_CHROMIUM = Path(CHROMIUM).exists()
SHOTS = os.environ.get("TASKFRAME_DASHBOARD_SHOTS")
module_loop = pytest.mark.asyncio(loop_scope="module")


class Fragile(Task[str], queue="dash"):
    n: int


class Sleepy(Task[None], queue="dash"):
    pass


class Tick(Task[None], queue="dash"):
    pass


class Noticed(Event):
    n: int


BROKEN = {"now": True}


def build(namespace: str) -> App:
    app = App(namespace)
    app.queue("dash", priorities=("high", "default"))

    @app.handle(Fragile, max_attempts=1)
    async def fragile(job: Fragile, ctx: Context) -> str:
        if BROKEN["now"]:
            raise RuntimeError(f"broken on {job.n}")
        return f"fixed {job.n}"

    @app.handle(Sleepy)
    async def sleepy(job: Sleepy, ctx: Context) -> None:
        await asyncio.sleep(60)

    @app.handle(Tick)
    async def tick(job: Tick, ctx: Context) -> None:
        pass

    @app.subscribe(Noticed, group="audit")
    async def audit(event: Noticed, ctx: Context) -> None:
        pass

    app.schedule("0 0 3 * * *", Tick(), name="nightly")
    return app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert HAVE_CHROMIUM, "no /usr/bin/chromium: run ./scripts/browser as root"
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(nats_server: NatsServer, namespace: str) -> AsyncIterator[Client]:
    async with connect(nats_server.url, namespace=namespace) as tf:
        await provision(build(namespace), tf)
        yield tf
        await _delete_streams(tf, namespace)


async def serve(app: object) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started, "the dashboard to listen")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await task
    sock.close()


@pytest_asyncio.fixture(loop_scope="module")
async def base(client: Client) -> AsyncIterator[str]:
    async for url in serve(create_app(client)):
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1200, "height": 700})
    yield await context.new_page()
    await context.close()


async def shot(page: Page, name: str) -> None:
    if SHOTS:
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@module_loop
async def test_a_dead_letter_shows_its_traceback_and_replay_runs_the_fixed_handler(
    client: Client, base: str, page: Page
) -> None:
    BROKEN["now"] = True
    run = await client.enqueue(Fragile(n=7))
    async with running_worker(build(client.namespace), client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the task to die")
        await page.goto(f"{base}/dead?queue=dash")
        letter = page.locator("section.letter")
        await expect(letter.locator("pre.traceback")).to_contain_text("RuntimeError: broken on 7")
        await expect(letter.locator("h3 a")).to_have_text(run.id)
        await shot(page, "dead-letters")
        BROKEN["now"] = False
        await letter.get_by_role("button", name="Replay").click()
        await expect(page.locator("#state")).to_have_text("succeeded")
        await expect(page.locator("#task")).to_contain_text("fixed 7")
        await shot(page, "task")
    assert await client.dead_letters() == []


@module_loop
async def test_dead_letters_are_filtered_and_read_a_page_at_a_time(
    client: Client, base: str, page: Page
) -> None:
    for _ in range(3):
        await client.js.publish(f"{client.namespace}.tasks.dash.Fragile", b"{")
    async with running_worker(build(client.namespace), client) as worker:
        await eventually(lambda: worker.stats.dead == 3, "three invalid tasks to die")
    seqs = [letter.seq for letter in await client.dead_letters()]
    await page.goto(f"{base}/dead?reason=invalid&limit=2")
    letters = page.locator("section.letter")
    assert [await s.get_attribute("data-seq") for s in await letters.all()] == list(
        map(str, seqs[:2])
    )
    await page.locator("#next").click()
    await expect(letters).to_have_count(1)
    assert await letters.get_attribute("data-seq") == str(seqs[2])
    await page.goto(f"{base}/dead?reason=failed")
    await expect(page.locator("main")).to_contain_text("no dead letters match these filters")


@module_loop
async def test_pause_sets_the_consumers_paused_and_the_overview_shows_it(
    client: Client, base: str, page: Page
) -> None:
    await page.goto(base)
    row = page.locator('tr[data-queue="dash"]')
    await expect(row.locator('[data-field="paused"]')).to_have_text("no")
    await row.get_by_role("button", name="Pause").click()
    await eventually(lambda: _paused(client), "the queue's consumers to be paused")
    await expect(row.locator('[data-field="paused"]')).to_have_text("paused")
    await row.get_by_role("button", name="Resume").click()
    await expect(row.locator('[data-field="paused"]')).to_have_text("no")
    assert not await _paused(client)


async def _paused(client: Client) -> bool:
    [queue] = await client.queues()
    return queue.paused


@module_loop
async def test_a_cancelled_running_task_shows_cancelled(
    client: Client, base: str, page: Page
) -> None:
    run = await client.enqueue(Sleepy())
    async with running_worker(build(client.namespace), client):
        await eventually(lambda: _state(client, run.id, "running"), "the task to run")
        await page.goto(f"{base}/tasks?id={run.id}")
        await expect(page.locator("#state")).to_have_text("running")
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#state")).to_have_text("cancelled")


@module_loop
async def test_a_flow_shows_its_steps_and_cancel_stops_what_has_not_run(
    client: Client, base: str, page: Page
) -> None:
    BROKEN["now"] = False
    flow = await client.enqueue(chain(Fragile(n=3), Sleepy(), Fragile(n=4)))
    async with running_worker(build(client.namespace), client):
        await eventually(lambda: _step(flow, 1, "running"), "the chain's second step to run")
        await page.goto(f"{base}/tasks?id={flow.id}")
        await expect(page.locator("#state")).to_have_text("running")
        steps = page.locator("table.steps tbody tr")
        await expect(steps).to_have_count(3)
        states = [steps.nth(i).locator('[data-field="state"]') for i in range(3)]
        await expect(states[0]).to_have_text("succeeded")
        await expect(states[1]).to_have_text("running")
        await expect(states[2]).to_have_text("waiting")
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#state")).to_have_text("cancelled")
        await expect(states[1]).to_have_text("cancelled")
        await steps.nth(0).locator("a").click()
        await expect(page.locator("#task")).to_contain_text("fixed 3")
    last = (await flow.status()).steps[2]
    assert (last.state, last.attempt) == ("cancelled", 0)  # dropped unrun


async def _step(flow: FlowRun[object], step: int, state: str) -> bool:
    return (await flow.status()).steps[step].state == state


async def _state(client: Client, task_id: str, state: str) -> bool:
    status = await client.status(task_id)
    return status is not None and status.state == state


@module_loop
async def test_the_overview_numbers_match_taskframe_queues_json_and_refresh_live(
    client: Client, base: str, page: Page, nats_server: NatsServer
) -> None:
    await client.enqueue(Tick(), priority="high")
    await page.goto(base)
    row = page.locator('tr[data-queue="dash"]')
    await expect(row.locator('[data-field="waiting"]')).to_have_text("1")
    await client.enqueue(Tick())
    await client.enqueue(Tick(), priority="high")
    await expect(row.locator('[data-field="waiting"]')).to_have_text("3")  # without a reload
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskframe", "queues", "--json"),
        *("--namespace", client.namespace, "--url", nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = await proc.communicate()
    [listed] = json.loads(out)
    assert len(listed["lanes"]) == 2
    for field in ("waiting", "in_flight", "redelivered", "dead"):
        assert await row.locator(f'[data-field="{field}"]').inner_text() == str(listed[field])
    assert listed["waiting"] == 3


@module_loop
async def test_workers_and_schedules_pages_list_what_the_server_holds(
    client: Client, base: str, page: Page
) -> None:
    async with running_worker(build(client.namespace), client, queues=["dash"]) as worker:
        await eventually(client.workers, "the worker's registry record")
        await page.goto(f"{base}/workers")
        await expect(page.locator("#workers")).to_contain_text(worker.id)
        await shot(page, "workers")
    await page.goto(f"{base}/schedules")
    await expect(page.locator("#schedules")).to_contain_text("nightly")
    await expect(page.locator("#schedules")).to_contain_text("0 0 3 * * *")
    await shot(page, "schedules")


@module_loop
async def test_a_post_without_the_csrf_token_is_forbidden(client: Client, base: str) -> None:
    for body in (b"", b"csrf=guessed"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await _post(f"{base}/queues/dash/pause", body)
        assert refused.value.code == 403
        refused.value.close()
    assert not await _paused(client)


async def _post(url: str, body: bytes, **headers: str) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)

    def send() -> bytes:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bytes(response.read())

    return await asyncio.to_thread(send)


@module_loop
async def test_a_token_is_needed_for_every_request_and_never_shown(
    client: Client, browser: Browser, nats_server: NatsServer
) -> None:
    own = create_app(url=nats_server.url, namespace=client.namespace, token="s3cret-t0ken")
    async for url in serve(own):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-t0ken"})
        with await asyncio.to_thread(urllib.request.urlopen, request, timeout=5) as response:
            page = response.read().decode()
        assert "Queues" in page
        assert "s3cret-t0ken" not in page
        browsing = await browser.new_context()
        opened = await browsing.new_page()
        await opened.goto(f"{url}/workers?token=s3cret-t0ken")  # sets a cookie, then drops it
        assert "token" not in opened.url
        await expect(opened.locator("h1")).to_have_text("Workers")
        await opened.goto(f"{url}/schedules")
        await expect(opened.locator("h1")).to_have_text("Schedules")
        assert "s3cret-t0ken" not in await opened.content()
        await browsing.close()


@module_loop
async def test_it_mounts_inside_another_starlette_app(client: Client, page: Page) -> None:
    service = Starlette(routes=[Mount("/ops", create_app(client))])
    async for url in serve(service):
        await page.goto(f"{url}/ops/")
        await page.get_by_role("link", name="Schedules").click()
        await expect(page.locator("#schedules")).to_contain_text("nightly")
        assert page.url == f"{url}/ops/schedules"


@module_loop
async def test_the_cli_refuses_a_non_loopback_host_without_a_token() -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskframe", "dashboard", "--host", "0.0.0.0", "--port", "1"),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TASKFRAME_DASHBOARD_TOKEN": ""},
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0
    assert "not a loopback address, without --token" in err.decode()


@module_loop
async def test_importing_taskframe_and_its_cli_does_not_import_starlette() -> None:
    code = "import sys, taskframe, taskframe.cli; print('starlette' in sys.modules)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert out.decode().strip() == "False"


@module_loop
async def test_the_overview_shows_throughput_and_event_groups_live(
    client: Client, base: str, page: Page
) -> None:
    for n in range(3):
        await client.publish(Noticed(n=n))
        await client.enqueue(Tick())
    await page.goto(base)
    row = page.locator('tr[data-queue="dash"]')
    await expect(row.locator('[data-field="done_per_minute"]')).to_have_text("measuring")
    await expect(page.locator('tr[data-group="audit"] [data-field="pending"]')).to_have_text("3")
    async with running_worker(build(client.namespace), client) as worker:
        await eventually(lambda: worker.stats.succeeded == 6, "the ticks and events to be handled")
        await expect(page.locator('tr[data-group="audit"] [data-field="pending"]')).to_have_text(
            "0"
        )
        done = row.locator('[data-field="done_per_minute"]')
        await expect(done).not_to_have_text("measuring")
        await expect(done).not_to_have_text("0.0")  # the three ticks, per minute of the span
        assert float(await done.inner_text()) > 0
        await expect(page.locator("#throughput-note")).to_contain_text("removed from")
        await shot(page, "overview")


def test_throughput_rates_come_from_counter_samples_over_the_window() -> None:
    now = [0.0]
    rates = Rates(clock=lambda: now[0])
    assert rates.observe("S", last_seq=10, messages=10).done_per_minute is None
    now[0] = 30.0
    rate = rates.observe("S", last_seq=40, messages=25)  # 30 stored, 15 removed in 30 s
    assert (rate.stored_per_minute, rate.done_per_minute, rate.span) == (60.0, 30.0, 30.0)
    now[0] = 30.0 + WINDOW
    rate = rates.observe("S", last_seq=40, messages=25)  # nothing since: the old sample aged out
    assert (rate.stored_per_minute, rate.done_per_minute) == (0.0, 0.0)
    now[0] += 10
    assert rates.observe("S", last_seq=2, messages=2).done_per_minute is None  # stream made anew


@module_loop
async def test_dead_letters_are_deleted_one_or_all_matching_and_replayed_all_matching(
    client: Client, base: str, page: Page
) -> None:
    BROKEN["now"] = True
    answers: list[bool] = []

    async def answer(dialog: Dialog) -> None:
        await (dialog.accept() if answers.pop(0) else dialog.dismiss())

    page.on("dialog", answer)
    for _ in range(3):
        await client.js.publish(f"{client.namespace}.tasks.dash.Fragile", b"{")
    runs = [await client.enqueue(Fragile(n=n)) for n in range(2)]
    async with running_worker(build(client.namespace), client) as worker:
        await eventually(lambda: worker.stats.dead == 5, "five tasks to die")
        invalid = [d.seq for d in await client.dead_letters(reason="invalid")]
        await page.goto(f"{base}/dead?reason=invalid")
        answers.append(True)
        await (
            page.locator(f'section[data-seq="{invalid[0]}"]')
            .get_by_role("button", name="Delete")
            .click()
        )
        await expect(page.locator("#notice")).to_have_text("Deleted 1 dead letter.")
        assert "reason=invalid" in page.url
        assert [d.seq for d in await client.dead_letters(reason="invalid")] == invalid[1:]
        csrf = await page.locator('input[name="csrf"]').first.get_attribute("value")
        again = await page.request.post(
            f"{base}/dead/{invalid[0]}/delete", form={"csrf": csrf or ""}, max_redirects=0
        )
        assert again.status == 404  # gone already: said so, nothing else removed
        answers.append(False)  # asked, and told no: nothing goes
        await page.locator("#delete-all").click()
        await expect(page.locator("section.letter")).to_have_count(2)
        answers.append(True)
        await page.locator("#delete-all").click()
        await expect(page.locator("#notice")).to_have_text("Deleted 2 dead letters.")
        assert await client.dead_letters(reason="invalid") == []
        assert len(await client.dead_letters(reason="failed")) == 2  # outside the filter
        BROKEN["now"] = False
        await page.goto(f"{base}/dead?queue=dash&reason=failed")
        answers.append(True)
        await page.locator("#replay-all").click()
        await expect(page.locator("#notice")).to_have_text("Replayed 2 dead letters.")
        assert [await run.result(timeout=10) for run in runs] == ["fixed 0", "fixed 1"]
    assert await client.dead_letters() == []
    assert answers == []


async def _get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    def send() -> tuple[int, str, dict[str, str]]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode(), dict(response.headers)
        except urllib.error.HTTPError as refused:
            with refused:
                return refused.code, refused.read().decode(), dict(refused.headers)

    return await asyncio.to_thread(send)


def _env(**more: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **more}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@module_loop
async def test_basic_auth_guards_the_cli_dashboard_and_its_password_is_never_shown(
    client: Client, browser: Browser, nats_server: NatsServer
) -> None:
    password, port = "pw-Zq81-secret", _free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskframe", "dashboard", "--port", str(port)),
        *("--namespace", client.namespace, "--url", nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_env(TASKFRAME_DASHBOARD_BASIC_AUTH=f"ops:{password}"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        first = await eventually(lambda: _answer(url), "the dashboard to listen")
        assert first is not None
        status, _, headers = first
        assert status == 401
        assert headers["www-authenticate"].startswith("Basic")
        for wrong in (f"ops:{password}x", f"root:{password}", "ops"):
            assert (await _get(url, Authorization=_basic(wrong)))[0] == 401
        status, body, _ = await _get(f"{url}/dead", Authorization=_basic(f"ops:{password}"))
        assert status == 200
        assert password not in body
        browsing = await browser.new_context(
            http_credentials={"username": "ops", "password": password}
        )
        opened = await browsing.new_page()
        await opened.goto(f"{url}/schedules")
        await expect(opened.locator("#schedules")).to_contain_text("nightly")
        assert password not in await opened.content()
        await browsing.close()
    finally:
        proc.terminate()
        out, _ = await proc.communicate()
    assert password not in out.decode()


async def _answer(url: str) -> tuple[int, str, dict[str, str]] | None:
    try:
        status, body, headers = await _get(url)
    except (urllib.error.URLError, ConnectionError):
        return None
    return status, body, {k.lower(): v for k, v in headers.items()}


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


@module_loop
async def test_the_cli_refuses_malformed_basic_auth_without_echoing_it() -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskframe", "dashboard", "--port", "1"),
        stderr=asyncio.subprocess.PIPE,
        env=_env(TASKFRAME_DASHBOARD_BASIC_AUTH="no-colon-s3cret"),
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "USER:PASSWORD" in err.decode()
    assert "no-colon-s3cret" not in err.decode()


@module_loop
async def test_pages_say_the_broker_is_away_and_recover_when_it_is_back(
    own_server: NatsServer, namespace: str, page: Page
) -> None:
    async with connect(own_server.url, namespace=namespace) as tf:
        await provision(build(namespace), tf)
    async for url in serve(create_app(url=own_server.url, namespace=namespace)):
        await page.goto(url)
        await expect(page.locator('tr[data-queue="dash"]')).to_be_visible()
        own_server.kill()
        await expect(page.locator("#banner")).to_contain_text("cannot be reached")
        answered = await page.goto(f"{url}/dead")
        assert answered is not None
        assert answered.status == 503
        await expect(page.locator("#error")).to_have_text("The broker cannot be reached")
        own_server.start()
        await expect(page.locator("h1")).to_have_text("Dead letters", timeout=15_000)
        await page.goto(url)
        await expect(page.locator('tr[data-queue="dash"]')).to_be_visible()
        async with connect(own_server.url, namespace=namespace) as tf:
            await _delete_streams(tf, namespace)  # every stream gone: empty pages, no errors
        for path, text in (
            ("/", "no queues"),
            ("/dead", "no dead letters"),
            ("/schedules", "no periodic"),
        ):
            answered = await page.goto(f"{url}{path}")
            assert answered is not None
            assert answered.status == 200
            await expect(page.locator("main")).to_contain_text(text)


@module_loop
async def test_bad_ids_and_names_get_a_clear_400(client: Client, base: str) -> None:
    run = await client.enqueue(Tick())
    for path, said in (
        ("/tasks/a%2Ab", "'a*b' is not a task id"),
        ("/tasks/x%20y", "'x y' is not a task id"),
        ("/dead?queue=%3E", "'>' is not a queue name"),
        ("/dead?task=a.b", "'a.b' is not a task name"),
    ):
        status, body, _ = await _get(f"{base}{path}")
        assert (status, body) == (400, said)
    [queue] = await client.queues()
    assert queue.waiting == 1
    status, body, _ = await _get(f"{base}/tasks/{run.id}")  # the dashboard still serves
    assert status == 200
    assert run.id in body
