"""Periodic tasks (taskframe.schedules, App.schedule): declared, kept by the broker, fired
once per tick however many workers run; and their expressions (taskframe._cron): parsing,
fire times across time zones and DST, and agreement with nats-server."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import nats
import pytest
from nats.js import api as js_api
from nats.js.errors import APIError

from taskframe import App, Client, ConfigError, Context, Periodic, Task, provision
from taskframe._cron import Schedule
from taskframe.schedules import stored_schedules
from taskframe.testing import NatsServer, eventually
from tests.conftest import Workers


class Ping(Task[None], queue="cron", results=False):
    note: str = ""


# Declaring ------------------------------------------------------------------------------


def test_schedule_declares_a_periodic_task() -> None:
    app = App("ns")
    nightly = app.schedule("0 0 3 * * *", Ping(note="n"), name="nightly", time_zone="UTC")
    often = app.schedule(task=Ping(), every=timedelta(minutes=5), name="often")
    assert nightly == Periodic("nightly", Ping(note="n"), "0 0 3 * * *", "UTC")
    assert (often.expression, often.time_zone, often.queue) == ("@every 300s", None, "cron")
    assert app.schedule(task=Ping(), every=90.0, name="x").expression == "@every 90s"
    assert app.schedules == {"nightly": nightly, "often": often, "x": app.schedules["x"]}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"cron": "@daily", "every": 60.0}, "either a cron expression or every="),
        ({}, "either a cron expression or every="),
        ({"cron": "* * * * *"}, "has 5 fields"),
        ({"every": 1.5}, "whole number of seconds"),
        ({"cron": "@daily", "name": "a.b"}, "schedule name"),
        ({"cron": "@daily", "name": "taken"}, "already declared"),
        ({"cron": "@daily", "task": None}, "needs the task"),
    ],
)
def test_a_bad_declaration_is_a_config_error(arguments: dict[str, object], message: str) -> None:
    app = App("ns")
    app.schedule("@hourly", Ping(), name="taken")
    with pytest.raises(ConfigError, match=message):
        app.schedule(**{"task": Ping(), "name": "new", **arguments})  # type: ignore[call-overload]


# Kept and fired by the broker -----------------------------------------------------------


async def test_a_schedule_fires_once_per_tick_with_three_workers(
    namespace: str, workers: Workers
) -> None:
    fired: list[float] = []
    app = App(namespace)
    app.schedule(task=Ping(note="tick"), every=1.0, name="heartbeat")

    @app.handle(Ping)
    async def ping(job: Ping, ctx: Context) -> None:
        fired.append(time.time())

    async with workers(app, 3):
        await eventually(lambda: len(fired) >= 4, "four ticks")
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert all(0.8 < gap < 1.2 for gap in gaps), gaps  # one per tick: no doubles, no misses


async def test_schedules_are_reconciled_and_listed(client: Client) -> None:
    app = App(client.namespace)
    app.schedule("0 0 3 * * *", Ping(note="nightly"), name="nightly")
    app.schedule(task=Ping(note="often"), every=300.0, name="often")

    @app.handle(Ping)
    async def ping(job: Ping, ctx: Context) -> None: ...

    await provision(app, client)
    listed = {s.name: s for s in await stored_schedules(client.js, client.namespace)}
    assert set(listed) == {"nightly", "often"}
    assert listed["nightly"].expression == "0 0 3 * * *"
    assert (listed["often"].queue, listed["often"].task) == ("cron", "Ping")
    nightly = listed["nightly"].next_fire
    assert nightly is not None
    assert (nightly.hour, nightly.minute, nightly.second) == (3, 0, 0)
    often = listed["often"].next_fire
    assert often is not None
    assert 0 < (often - datetime.now(UTC)).total_seconds() <= 300
    # A page reads only its own schedules, in name order.
    first = await stored_schedules(client.js, client.namespace, limit=1)
    rest = await stored_schedules(client.js, client.namespace, offset=1, limit=5)
    assert [s.name for s in first + rest] == ["nightly", "often"]
    assert await stored_schedules(client.js, client.namespace, offset=2) == []

    # Provisioning again changes nothing; dropping a declaration removes its schedule.
    await provision(app, client)
    assert {s.name: s for s in await stored_schedules(client.js, client.namespace)} == listed
    del app.schedules["often"]
    await provision(app, client)
    assert [s.name for s in await stored_schedules(client.js, client.namespace)] == ["nightly"]


# Expressions ----------------------------------------------------------------------------


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("@every 1s", "@every 1s"),
        ("@every 1m30s", "@every 90s"),
        ("@every 1h", "@every 3600s"),
        ("@every 2h45m", "@every 9900s"),
        ("@every 1000ms", "@every 1s"),
        ("@every 1.0s", "@every 1s"),
        ("@every 1.5m", "@every 90s"),
        ("@every 1s500ms500ms", "@every 2s"),
        ("  @every   300s ", "@every 300s"),
        ("*/2 * * * * *", "*/2 * * * * *"),
        ("0  */5 *\t* * *", "0 */5 * * * *"),
        ("0 0 9 * * MON-Fri", "0 0 9 * * mon-fri"),
        ("0 0 0 1 JAN *", "0 0 0 1 jan *"),
        ("? * * * * *", "? * * * * *"),
        ("@Daily", "@daily"),
        ("@annually", "@annually"),
    ],
)
def test_parse_normalises(text: str, expression: str) -> None:
    assert Schedule.parse(text).expression == expression


def test_schedules_compare_by_normalised_expression() -> None:
    assert Schedule("*/2  * * * * *") == Schedule.parse("*/2 * * * * *")
    assert Schedule.parse("@every 1m") == Schedule.every(60)
    assert Schedule.parse("@daily", "UTC") != Schedule.parse("@daily")
    assert repr(Schedule.every(5)) == "Schedule(expression='@every 5s', time_zone=None)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("* * * * *", "has 5 fields; it needs 6"),
        ("0 * * * * * *", "has 7 fields"),
        ("", "has 0 fields"),
        ("60 * * * * *", "second '60': outside 0-59"),
        ("0 60 * * * *", "minute '60'"),
        ("0 0 24 * * *", "hour '24'"),
        ("0 0 0 0 * *", "day of month '0': outside 1-31"),
        ("0 0 0 32 * *", "day of month '32'"),
        ("0 0 0 1 13 *", "month '13'"),
        ("0 0 0 1 0 *", "month '0'"),
        ("0 0 0 * * 7", "7 is not accepted"),
        ("0 0 0 * * 1-7", "day of week '7'"),
        ("0 0 0 * * sat-sun", "'sat-sun': the range runs backwards"),
        ("10-5 * * * * *", "second '10-5': the range runs backwards"),
        ("*/0 * * * * *", "second '*/0': the step must be a positive number"),
        ("5/ * * * * *", "the step must be a positive number"),
        ("1/2/3 * * * * *", "the step must be a positive number"),
        ("1-5-7 * * * * *", "second '5-7': expected a number"),
        ("-1 * * * * *", "second '': expected a number"),
        ("0 0 0 * * monday", "day of week 'monday': expected a number or a name like sun"),
        ("0 0 0 1 january *", "month 'january'"),
        ("0 0 0 * mon *", "month 'mon'"),
        ("0 0 0 jan * *", "day of month 'jan': expected a number"),
        ("0 0 0 L * *", "day of month 'L'"),
        ("0 0 0 * * mon#1", "day of week 'mon#1'"),
        ("0 0 0 ,1 * *", "day of month ''"),
        ("0 0 0 30 feb *", "never fires: no month of 'feb' has a day '30'"),
        ("0 0 0 31 4,6,9,11 *", "never fires"),
        ("@reboot", "unknown schedule '@reboot'"),
        ("@every", "must be a Go duration"),
        ("@every 2", "must be a Go duration"),
        ("@every 1d", "must be a Go duration"),
        ("@every 1S", "must be a Go duration"),
        ("@every .", "must be a Go duration"),
        ("@every 500ms", "at least 1s"),
        ("@every .5s", "at least 1s"),
        ("@every -1s", "at least 1s"),
        ("@every 0s", "at least 1s"),
        ("@every 1.5s", "whole seconds"),
        ("@every 1s1ns", "whole seconds"),
        ("@every 2562048h", "too long"),
    ],
)
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Schedule.parse(text)
    assert message in str(caught.value)


def test_time_zones() -> None:
    assert Schedule.parse("0 0 9 * * *", "Europe/Amsterdam").time_zone == "Europe/Amsterdam"
    assert Schedule.parse("@daily", time_zone="Asia/Kolkata").expression == "@daily"
    with pytest.raises(ConfigError, match="applies to cron and named patterns only"):
        Schedule.parse("@every 1s", "UTC")
    for bad in ("Nowhere/Zone", "", "Local", "../etc/passwd"):
        with pytest.raises(ConfigError, match="unknown time zone"):
            Schedule.parse("@daily", bad)


def test_every_builds_whole_second_intervals() -> None:
    assert Schedule.every(300).expression == "@every 300s"
    assert Schedule.every(1.0).expression == "@every 1s"
    assert Schedule.every(86_400.0).expression == "@every 86400s"
    for bad in (0.5, 0.0, -5.0, 1.5, 90.25, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="whole number of seconds"):
            Schedule.every(bad)


@pytest.mark.parametrize(
    ("text", "after", "expected"),
    [
        ("*/2 * * * * *", utc(2026, 5, 1, 10, 0, 1), utc(2026, 5, 1, 10, 0, 2)),
        ("*/2 * * * * *", utc(2026, 5, 1, 10, 0, 2), utc(2026, 5, 1, 10, 0, 4)),  # strictly
        ("*/2 * * * * *", utc(2026, 5, 1, 10, 0, 1, 999_999), utc(2026, 5, 1, 10, 0, 2)),
        ("5-20/5 * * * * *", utc(2026, 5, 1, 10, 0, 20), utc(2026, 5, 1, 10, 1, 5)),
        ("10/15 * * * * *", utc(2026, 5, 1, 10, 0, 41), utc(2026, 5, 1, 10, 0, 55)),
        ("0 */5 * * * *", utc(2026, 5, 1, 10, 58), utc(2026, 5, 1, 11, 0)),
        ("0 0 */6 * * *", utc(2026, 5, 1, 18, 0, 1), utc(2026, 5, 2, 0, 0)),
        ("0 0 0 1,15 * *", utc(2026, 5, 1), utc(2026, 5, 15)),
        ("0 0 0 31 * *", utc(2026, 4, 1), utc(2026, 5, 31)),
        ("0 0 0 31 * *", utc(2026, 1, 31), utc(2026, 3, 31)),  # February has none
        ("0 0 0 29 2 *", utc(2025, 3, 1), utc(2028, 2, 29)),  # next leap year
        ("0 0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29)),  # 2100 is not a leap year
        ("0 0 0 1 jan *", utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1)),
        ("0 0 0 * JAN-mar *", utc(2026, 3, 31, 12), utc(2027, 1, 1)),
        ("59 59 23 31 12 *", utc(2026, 12, 31, 23, 59, 59), utc(2027, 12, 31, 23, 59, 59)),
        ("@yearly", utc(2026, 12, 31, 23, 59, 59, 500_000), utc(2027, 1, 1)),
        ("@monthly", utc(2026, 1, 31, 12), utc(2026, 2, 1)),
        ("@weekly", utc(2026, 11, 28, 12), utc(2026, 11, 29)),  # Saturday -> Sunday
        ("@daily", utc(2026, 11, 28, 0, 0, 0), utc(2026, 11, 29)),
        ("@midnight", utc(2026, 2, 28, 23), utc(2026, 3, 1)),
        ("@hourly", utc(2026, 11, 28, 23, 30), utc(2026, 11, 29, 0, 0)),
        ("0 0 9 * * mon-fri", utc(2026, 11, 27, 9, 0, 0), utc(2026, 11, 30, 9)),  # Fri -> Mon
        ("0 0 9 * * SUN", utc(2026, 11, 28), utc(2026, 11, 29, 9)),
        ("0 0 9 * * 0,6", utc(2026, 11, 27, 10), utc(2026, 11, 28, 9)),
    ],
)
def test_next_after(text: str, after: datetime, expected: datetime) -> None:
    assert Schedule.parse(text).next_after(after) == expected


def fires(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        after = schedule.next_after(after)
        found.append(after)
    return found


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # May 2026: Fridays are the 1st, 8th, 15th; the 13th is a Wednesday.
    either = Schedule.parse("0 0 12 13 * fri")
    assert [d.day for d in fires(either, utc(2026, 5, 2), 3)] == [8, 13, 15]
    # `*`, `?` and `*/1` leave the day of month unrestricted: only the weekday counts.
    for unrestricted in ("*", "?", "*/1"):
        fridays = Schedule.parse(f"0 0 12 {unrestricted} * fri")
        assert [d.day for d in fires(fridays, utc(2026, 5, 2), 3)] == [8, 15, 22]
    # A range over every day is a restriction, so OR applies and every day matches.
    assert [d.day for d in fires(Schedule.parse("0 0 12 1-31 * fri"), utc(2026, 5, 2), 2)] == [2, 3]
    # A step over the days is a restriction too: odd days or Fridays.
    odd_or_friday = Schedule.parse("0 0 12 */2 * fri")
    assert [d.day for d in fires(odd_or_friday, utc(2026, 5, 2), 4)] == [3, 5, 7, 8]
    # Unrestricted weekday: only the day of month counts.
    assert [d.day for d in fires(Schedule.parse("0 0 12 13 * *"), utc(2026, 5, 2), 1)] == [13]


def test_every_fires_on_the_grid_of_the_rounded_anchor() -> None:
    schedule = Schedule.parse("@every 1m30s")
    anchor = utc(2026, 5, 1, 12, 0, 0, 400_000)  # stored; rounds down to 12:00:00
    assert schedule.next_after(utc(2026, 5, 1, 12, 0, 0, 500_000), anchor) == utc(
        2026, 5, 1, 12, 1, 30
    )
    assert schedule.next_after(utc(2026, 5, 1, 12, 1, 30), anchor) == utc(2026, 5, 1, 12, 3)
    assert schedule.next_after(utc(2026, 5, 1, 15, 0, 1), anchor) == utc(2026, 5, 1, 15, 1, 30)
    assert schedule.next_after(utc(2026, 5, 1, 11), anchor) == utc(2026, 5, 1, 12, 1, 30)
    late = utc(2026, 5, 1, 12, 0, 0, 500_000)  # rounds up to 12:00:01
    assert schedule.next_after(late, late) == utc(2026, 5, 1, 12, 1, 31)
    assert schedule.next_after(utc(2026, 5, 1, 12, 0, 0, 700_000)) == utc(2026, 5, 1, 12, 1, 31)
    amsterdam = datetime(2026, 5, 1, 14, 0, tzinfo=ZoneInfo("Europe/Amsterdam"))
    assert Schedule.every(60).next_after(amsterdam) == utc(2026, 5, 1, 12, 1)


def test_next_after_needs_aware_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Schedule.parse("@hourly").next_after(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="anchor must be"):
        Schedule.every(5).next_after(utc(2026, 1, 1), datetime(2026, 1, 1))


def test_time_zone_without_dst() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    schedule = Schedule.parse("0 30 9 * * mon-fri", "Asia/Kolkata")
    first = schedule.next_after(utc(2026, 11, 27, 4, 0, 1))  # Friday 09:30:01 in Kolkata
    assert first == utc(2026, 11, 30, 4, 0)
    assert first.tzinfo is UTC
    assert first.astimezone(kolkata).replace(tzinfo=None) == datetime(2026, 11, 30, 9, 30)


def test_dst_spring_forward_skips_the_missing_wall_time() -> None:
    # Amsterdam, 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    schedule = Schedule.parse("0 30 2 * * *", "Europe/Amsterdam")
    days = fires(schedule, utc(2026, 3, 27, 12), 3)
    assert days == [
        utc(2026, 3, 28, 1, 30),  # CET, +1
        utc(2026, 3, 30, 0, 30),  # CEST, +2; the 29th has no 02:30
        utc(2026, 3, 31, 0, 30),
    ]
    hourly = Schedule.parse("0 0 * * * *", "Europe/Amsterdam")
    assert hourly.next_after(utc(2026, 3, 29, 0, 30)) == utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    three = hourly.next_after(utc(2026, 3, 29, 0, 30)).astimezone(ZoneInfo("Europe/Amsterdam"))
    assert three.hour == 3


def test_dst_fall_back_fires_a_repeated_wall_time_twice() -> None:
    # Amsterdam, 25 October 2026: 03:00 CEST falls back to 02:00 CET; 02:xx happens twice.
    schedule = Schedule.parse("0 30 2 * * *", "Europe/Amsterdam")
    days = fires(schedule, utc(2026, 10, 24, 12), 3)
    assert days == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 26, 1, 30),
    ]
    assert [d.astimezone(ZoneInfo("Europe/Amsterdam")).fold for d in days[:2]] == [0, 1]
    # From inside the first pass, the second pass of an earlier wall time comes next.
    every20 = Schedule.parse("0 */20 * * * *", "Europe/Amsterdam")
    assert fires(every20, utc(2026, 10, 25, 0, 50), 4) == [
        utc(2026, 10, 25, 1, 0),  # 02:00 CET
        utc(2026, 10, 25, 1, 20),
        utc(2026, 10, 25, 1, 40),
        utc(2026, 10, 25, 2, 0),  # 03:00 CET
    ]


def brute_force(
    zone: ZoneInfo, start: datetime, hours: int, matches: Callable[[datetime], bool]
) -> list[datetime]:
    """Every whole second in the span whose wall-clock reading in `zone` matches."""
    found = []
    for offset in range(1, hours * 3600 + 1):
        instant = start + timedelta(seconds=offset)
        if matches(instant.astimezone(zone)):
            found.append(instant)
    return found


@pytest.mark.parametrize(
    ("text", "zone", "start", "matches"),
    [
        (
            "0 */20 * * * *",
            "Europe/Amsterdam",
            utc(2026, 10, 24, 23),
            lambda d: d.second == 0 and d.minute % 20 == 0,
        ),
        (
            "30 15,45 1-3 * * *",
            "Europe/Amsterdam",
            utc(2026, 3, 28, 23),
            lambda d: d.second == 30 and d.minute in (15, 45) and 1 <= d.hour <= 3,
        ),
        (
            "0 0,30 * * * *",
            "Australia/Lord_Howe",  # a half-hour DST shift
            utc(2026, 4, 4, 12),
            lambda d: d.second == 0 and d.minute in (0, 30),
        ),
        (
            "0 59 0,1,2 * * sun",
            "America/New_York",
            utc(2026, 11, 1, 3),
            lambda d: d.second == 0 and d.minute == 59 and d.hour <= 2 and d.weekday() == 6,
        ),
    ],
)
def test_matches_a_second_by_second_walk_across_dst(
    text: str, zone: str, start: datetime, matches: Callable[[datetime], bool]
) -> None:
    expected = brute_force(ZoneInfo(zone), start, 6, matches)
    assert expected
    schedule = Schedule.parse(text, zone)
    assert fires(schedule, start, len(expected)) == expected


def test_rare_schedules_are_found_without_walking_every_second() -> None:
    # Years apart, found by stepping through months and days rather than seconds.
    schedule = Schedule.parse("0 0 0 29 feb *")
    assert fires(schedule, utc(2026, 1, 1), 3) == [
        utc(2028, 2, 29),
        utc(2032, 2, 29),
        utc(2036, 2, 29),
    ]
    assert Schedule.parse("59 59 23 31 dec *", "Pacific/Kiritimati").next_after(
        utc(2026, 1, 1)
    ) == utc(2026, 12, 31, 9, 59, 59)  # Kiritimati is UTC+14


# Expressions the parser accepts: nats-server must accept what we send.
ACCEPTED = [
    ("@every 1s", None),
    ("@every 1m30s", None),
    ("@every 2h45m", None),
    ("*/2 * * * * *", None),
    ("0 */5 * * * *", None),
    ("5-20/5 * * * * *", None),
    ("10/15 * * * * *", None),
    ("0 0 9 * * MON-fri", None),
    ("0 0 0 1 jan *", None),
    ("0 0 0 13 * fri", None),
    ("0 0 0 29 feb *", None),
    ("0 0 0 ? * sun,sat", None),
    ("0 0 9 * * mon-fri", "Europe/Amsterdam"),
    ("0 30 9 * * *", "Asia/Kolkata"),
    ("@daily", "Europe/Amsterdam"),
    ("@yearly", None),
    ("@annually", None),
    ("@monthly", None),
    ("@weekly", None),
    ("@midnight", None),
    ("@hourly", None),
]
# Expressions the parser rejects, sent raw: the server must reject them too.
REJECTED = [
    ("@every 500ms", None),
    ("@every 2", None),
    ("@every -1s", None),
    ("@every 1s", "Europe/Amsterdam"),
    ("* * * * *", None),
    ("0 * * * * * *", None),
    ("60 * * * * *", None),
    ("0 0 24 * * *", None),
    ("0 0 0 32 * *", None),
    ("0 0 0 1 13 *", None),
    ("0 0 0 * * 7", None),
    ("0 0 0 * * sat-sun", None),
    ("*/0 * * * * *", None),
    ("0 0 0 30 feb *", None),
    ("0 0 0 * * monday", None),
    ("@reboot", None),
    ("0 0 9 * * *", "Nowhere/Zone"),
]


async def test_the_server_agrees_with_the_parser(nats_server: NatsServer, namespace: str) -> None:
    prefix, stream = f"{namespace}.x", f"X_{namespace}"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            js_api.StreamConfig(
                name=stream,
                subjects=[f"{prefix}.tasks.q.>", f"{prefix}.sched.q.>"],
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                storage=js_api.StorageType.MEMORY,
                allow_msg_schedules=True,
            )
        )
        for i, (text, zone) in enumerate(ACCEPTED):
            schedule = Schedule.parse(text, zone)
            headers = _headers(prefix, schedule.expression, zone)
            ack = await js.publish(f"{prefix}.sched.q.ok{i}", b"", headers=headers)
            assert ack.seq > 0, text
        for i, (text, zone) in enumerate(REJECTED):
            with pytest.raises(ConfigError):
                Schedule.parse(text, zone)
            headers = _headers(prefix, text, zone)
            with pytest.raises(APIError) as refused:
                await js.publish(f"{prefix}.sched.q.bad{i}", b"", headers=headers)
            assert refused.value.err_code in (10189, 10223), text  # 10223: bad time zone
        info = await js.stream_info(stream, subjects_filter=f"{prefix}.sched.q.>")
        assert len(info.state.subjects or {}) == len(ACCEPTED)
        await js.delete_stream(stream)  # or its schedules fire for the rest of the session
    finally:
        await nc.close()


def _headers(prefix: str, expression: str, zone: str | None) -> dict[str, str]:
    headers = {"Nats-Schedule": expression, "Nats-Schedule-Target": f"{prefix}.tasks.q.T"}
    if zone is not None:
        headers["Nats-Schedule-Time-Zone"] = zone
    return headers
