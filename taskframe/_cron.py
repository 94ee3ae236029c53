"""Schedule expressions as nats-server accepts them in `Nats-Schedule`, and their fire times.

    @every <duration>   a Go duration of whole seconds, at least 1 s: "@every 90s", "@every 1m30s"
    six cron fields     seconds first: "sec min hour day-of-month month day-of-week"
    a named pattern     @yearly @annually @monthly @weekly @daily @midnight @hourly

A cron field is `*` (or `?`), a number, a range `a-b`, a step `*/n`, `a-b/n` or `a/n` (from a
to the end), or a comma-separated list of these. Months may be named jan..dec and weekdays
sun..sat (0 is Sunday), in any case. A day matches when both day fields match, except that
when neither is `*` a day matching either one is enough (as in Vixie cron).

What the server accepts and when it fires is in docs/server-behaviour.md; this parser is
stricter than the server in a few corners it lets through silently (`+5`, `*-5`, empty list
items), takes whole seconds only for `@every`, and rejects the zone name "Local".
"""

from __future__ import annotations

import re
from bisect import bisect_left
from calendar import monthrange
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import MAXYEAR, UTC, date, datetime, time, timedelta, tzinfo
from fractions import Fraction
from typing import Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from taskframe.errors import ConfigError

__all__ = ["Schedule"]

_NAMED = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {name: i for i, name in enumerate(_MONTH_NAMES, 1)}
_WEEKDAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February of a leap year
_NUMBER = re.compile(r"[0-9]+")

_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
_NS |= {"m": 60 * 10**9, "h": 3600 * 10**9}
_DURATION = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")
_MAX_DURATION_NS = 2**63 - 1  # Go's time.Duration


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day of week", 0, 6, _WEEKDAYS),
)


@dataclass(frozen=True, slots=True)
class _Cron:
    """The parsed fields of a cron expression."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: tuple[int, ...]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def day_matches(self, day: date) -> bool:
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays  # cron counts from Sunday
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def dates(self, first: date) -> Iterator[date]:
        """The matching dates from `first` on, ascending."""
        for year in range(first.year, MAXYEAR + 1):
            for month in self.months:
                if (year, month) < (first.year, first.month):
                    continue
                low = first.day if (year, month) == (first.year, first.month) else 1
                for dom in range(low, monthrange(year, month)[1] + 1):
                    day = date(year, month, dom)
                    if self.day_matches(day):
                        yield day

    def walls(self, start: datetime) -> Iterator[datetime]:
        """The matching naive wall-clock times from `start` (a whole second) on, ascending."""
        for day in self.dates(start.date()):
            on_day = day == start.date()
            for hour in _from(self.hours, start.hour if on_day else 0):
                on_hour = on_day and hour == start.hour
                for minute in _from(self.minutes, start.minute if on_hour else 0):
                    on_minute = on_hour and minute == start.minute
                    for second in _from(self.seconds, start.second if on_minute else 0):
                        yield datetime.combine(day, time(hour, minute, second))


def _from(values: tuple[int, ...], low: int) -> tuple[int, ...]:
    return values[bisect_left(values, low) :]


@dataclass(frozen=True)
class Schedule:
    """A periodic schedule the broker fires: an `@every`, cron or named expression.

    Build it with `Schedule.parse` (or `Schedule(expression, time_zone)`, the same) or
    `Schedule.every`; a bad expression is a `ConfigError` naming the bad part.
    """

    expression: str
    """The normalised expression to send as the `Nats-Schedule` header."""
    time_zone: str | None = None
    """IANA zone the cron fields are read in (the `Nats-Schedule-Time-Zone` header); UTC if None."""
    _rule: _Cron | int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = " ".join(self.expression.split())
        rule: _Cron | int
        if text.lower().startswith("@every"):
            if self.time_zone is not None:
                raise ConfigError(
                    f"schedule {text!r}: a time zone applies to cron and named patterns only "
                    "(nats-server rejects one with @every)"
                )
            rule = _parse_every(text)
            text = f"@every {rule}s"
        else:
            if self.time_zone is not None:
                _zone(self.time_zone)
            if text.startswith("@"):
                text = text.lower()
                if text not in _NAMED:
                    raise ConfigError(
                        f"unknown schedule {self.expression!r}: named patterns are "
                        f"{', '.join(_NAMED)}"
                    )
                rule = _parse_cron(_NAMED[text], text)
            else:
                rule = _parse_cron(text, self.expression)
                text = text.lower()
        object.__setattr__(self, "expression", text)
        object.__setattr__(self, "_rule", rule)

    @classmethod
    def parse(cls, expression: str, time_zone: str | None = None) -> Self:
        """Parse `expression`; `time_zone` (IANA name) is allowed for cron and named patterns."""
        return cls(expression, time_zone)

    @classmethod
    def every(cls, seconds: float) -> Self:
        """An `@every` schedule of `seconds`, a whole number of seconds, at least 1."""
        if not (seconds >= 1 and float(seconds).is_integer()):
            raise ConfigError(
                f"every={seconds!r}: a periodic schedule needs a whole number of seconds, at "
                "least 1 (nats-server rounds fractional intervals: 1.5 s would fire every 2 s)"
            )
        return cls(f"@every {int(seconds)}s")

    def next_after(self, t: datetime, anchor: datetime | None = None) -> datetime:
        """The first fire time strictly after `t` (timezone-aware), as a UTC datetime.

        `@every` fires on the grid `anchor + k * interval` (k >= 1), `anchor` rounded to the
        second: give the time the schedule was stored (`t`, if None). A cron fires at every
        instant whose wall-clock reading in the zone matches its fields, as the server's
        clock walk does: a wall time skipped when clocks spring forward does not fire that
        day, and one repeated when they fall back fires twice.

        The result is in UTC because an aware datetime inside a repeated hour compares
        unequal to every datetime of another zone (PEP 495); `astimezone` it for display.
        """
        after = _utc(t, "t")
        if isinstance(self._rule, int):
            base = _round_second(_utc(anchor, "anchor") if anchor is not None else after)
            step = timedelta(seconds=self._rule)
            ticks = max(0, (after - base) // step) + 1
            return base + ticks * step
        return _next_cron(self._rule, self._tz(), after)

    def _tz(self) -> tzinfo:
        return _zone(self.time_zone) if self.time_zone is not None else UTC


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"unknown time zone {name!r}: give an IANA name like 'Europe/Amsterdam'"
        ) from exc


def _parse_every(text: str) -> int:
    """Whole seconds of `@every <duration>`, the duration read as Go's time.ParseDuration does."""
    _, _, duration = text.partition(" ")
    if not _DURATION.fullmatch(duration):
        raise ConfigError(
            f"schedule {text!r}: the duration must be a Go duration with units, like 90s, "
            "1m30s or 2h"
        )
    nanos = Fraction(0)
    for number, unit in _DURATION_PART.findall(duration.lstrip("+-")):
        nanos += Fraction(number if number != "." else "0") * _NS[unit]
    total = int(nanos)  # Go drops fractions of a nanosecond
    if duration.startswith("-"):
        total = -total
    if total > _MAX_DURATION_NS:
        raise ConfigError(f"schedule {text!r}: the duration is too long")
    if total < 10**9:
        raise ConfigError(f"schedule {text!r}: the interval must be at least 1s")
    if total % 10**9:
        raise ConfigError(
            f"schedule {text!r}: the interval must be whole seconds (nats-server rounds "
            "fractional intervals: 1.5s would fire every 2s)"
        )
    return total // 10**9


def _parse_cron(text: str, original: str) -> _Cron:
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise ConfigError(
            f"cron expression {original!r} has {len(parts)} fields; it needs 6, seconds first: "
            "'sec min hour day-of-month month day-of-week' (e.g. '0 */5 * * * *')"
        )
    parsed = [_parse_field(part, spec, original) for part, spec in zip(parts, _FIELDS, strict=True)]
    (seconds, _), (minutes, _), (hours, _), (days, any_day), (months, _), (weekdays, any_wd) = (
        parsed
    )
    rule = _Cron(
        seconds=tuple(sorted(seconds)),
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=days,
        months=tuple(sorted(months)),
        weekdays=weekdays,
        any_day=any_day,
        any_weekday=any_wd,
    )
    # Only "day of month AND every weekday" can name dates that do not exist (30 February);
    # the server rejects a cron that cannot fire within five years, so do we.
    if any_wd and not any(d <= _DAYS_IN_MONTH[m] for m in months for d in days):
        raise ConfigError(
            f"cron expression {original!r} never fires: no month of {parts[4]!r} has a day "
            f"{parts[3]!r}"
        )
    return rule


def _parse_field(text: str, spec: _Field, original: str) -> tuple[frozenset[int], bool]:
    """The values of one cron field, and whether it is unrestricted (`*`, `?`, `*/1`)."""
    values: set[int] = set()
    unrestricted = False
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text) or int(step_text) == 0:
                raise _field_error(original, spec, item, "the step must be a positive number")
            step = int(step_text)
        if span in ("*", "?"):
            low, high = spec.low, spec.high
            unrestricted = unrestricted or step == 1
        else:
            first, dash, last = span.partition("-")
            low = _value(first, spec, original)
            high = _value(last, spec, original) if dash else spec.high if slash else low
            if low > high:
                raise _field_error(original, spec, item, "the range runs backwards")
        values.update(range(low, high + 1, step))
    return frozenset(values), unrestricted


def _value(text: str, spec: _Field, original: str) -> int:
    if _NUMBER.fullmatch(text):
        value = int(text)
    elif spec.names and text.lower() in spec.names:
        value = spec.names[text.lower()]
    else:
        what = "a number or a name like " + next(iter(spec.names)) if spec.names else "a number"
        raise _field_error(original, spec, text, f"expected {what}")
    if not spec.low <= value <= spec.high:
        hint = " (0 is Sunday; 7 is not accepted)" if spec.names is _WEEKDAYS else ""
        raise _field_error(original, spec, text, f"outside {spec.low}-{spec.high}{hint}")
    return value


def _field_error(original: str, spec: _Field, part: str, why: str) -> ConfigError:
    return ConfigError(f"cron expression {original!r}: {spec.name} {part!r}: {why}")


def _utc(t: datetime, name: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return t.astimezone(UTC)


def _round_second(t: datetime) -> datetime:
    """`t` rounded to the nearest second, halves up, as Go's Time.Round does after 1970."""
    whole = t.replace(microsecond=0)
    return whole + timedelta(seconds=1) if t.microsecond >= 500_000 else whole


def _repeat(zone: tzinfo, wall: datetime) -> timedelta:
    """How long `wall` repeats when clocks fall back (zero if it occurs once or never)."""
    first = wall.replace(tzinfo=zone, fold=0).utcoffset() or timedelta(0)
    second = wall.replace(tzinfo=zone, fold=1).utcoffset() or timedelta(0)
    return max(timedelta(0), first - second)


def _instants(zone: tzinfo, wall: datetime) -> Iterator[datetime]:
    """The UTC instants whose reading in `zone` is `wall`: none in a gap, two in a repeat."""
    for fold in (0, 1):
        instant = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == wall:
            yield instant


def _next_cron(rule: _Cron, zone: tzinfo, after: datetime) -> datetime:
    start = after.replace(microsecond=0) + timedelta(seconds=1)
    local = start.astimezone(zone)
    wall = local.replace(tzinfo=None)
    if local.fold == 0:
        # Inside the first pass of a repeated hour, the second pass of earlier wall times
        # still lies ahead.
        wall -= _repeat(zone, wall)
    best: datetime | None = None
    limit: datetime | None = None
    for candidate in rule.walls(wall):
        if limit is not None and candidate >= limit:
            break
        for instant in _instants(zone, candidate):
            if instant >= start and (best is None or instant < best):
                best = instant
        if best is not None and limit is None:
            # Later wall times can only be earlier instants within a repeated hour.
            limit = candidate + _repeat(zone, candidate)
    if best is None:
        raise ValueError(f"no fire time after {after.isoformat()} before the year {MAXYEAR + 1}")
    return best
