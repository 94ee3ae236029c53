import pytest

from taskframe import App, ConfigError, Context, Event, Task


class Add(Task[int], queue="math"):
    a: int
    b: int


def test_handle_registers_and_returns_the_function_unchanged() -> None:
    app = App("ns")

    async def add(job: Add, ctx: Context) -> int:
        return job.a + job.b

    assert app.handle(Add)(add) is add
    handler = app.handlers[("math", "Add")]
    assert handler.is_async
    assert handler.max_attempts == 3
    assert app.queues == {"math"}
    assert repr(app) == "<App 'ns' handlers=1 queues=['math'] groups=[]>"


def test_plain_functions_are_marked_for_the_thread_pool() -> None:
    app = App("ns")

    @app.handle(Add)
    def add(job: Add, ctx: Context) -> int:
        return job.a + job.b

    assert not app.handlers[("math", "Add")].is_async


def test_a_second_handler_for_one_task_is_refused() -> None:
    app = App("ns")

    @app.handle(Add)
    async def first(job: Add, ctx: Context) -> int:
        return 0

    with pytest.raises(ConfigError, match=r"already has a handler: .*first"):

        @app.handle(Add)
        async def second(job: Add, ctx: Context) -> int:
            return 1


def test_return_annotation_must_match_the_declared_result() -> None:
    app = App("ns")
    with pytest.raises(ConfigError, match="declares"):

        @app.handle(Add)
        async def add(job: Add, ctx: Context) -> str:
            return ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_attempts": 0}, "max_attempts"), ({"timeout": 0.0}, "timeout")],
)
def test_policy_values_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        App("ns").handle(Add, **kwargs)  # type: ignore[arg-type]


def test_namespace_must_be_a_token() -> None:
    with pytest.raises(ConfigError):
        App("my.app")


def test_queue_options_are_checked_and_kept() -> None:
    app = App("ns")
    assert app.options("math").lanes == ("default",)  # not declared: one lane
    app.queue("math", priorities=("high", "default"), max_in_flight=5, rate_limit="10/s")
    options = app.options("math")
    assert (options.lanes, options.max_in_flight, options.rate_limit) == (
        ("high", "default"),
        5,
        "10/s",
    )
    for bad, message in [
        ({"priorities": ("high", "low")}, "must include 'default'"),
        ({"priorities": ("default", "default")}, "repeat a lane"),
        ({"priorities": ("default", "a.b")}, "priority"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"rate_limit": "fast"}, "rate"),
    ]:
        with pytest.raises(ConfigError, match=message):
            app.queue("math", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="queue"):
        app.queue("a b")


def test_subscribers_register_per_group() -> None:
    app = App("ns")

    class Placed(Event):
        order: int

    @app.subscribe(Placed, group="billing", max_attempts=5)
    async def bill(event: Placed, ctx: Context) -> None: ...

    @app.subscribe(Placed, group="search")
    async def index(event: Placed, ctx: Context) -> None: ...

    assert app.groups == {"billing", "search"}
    assert app.queues == set()
    assert app.subscribers[("billing", "Placed")].max_attempts == 5
    with pytest.raises(ConfigError, match="already subscribes"):
        app.subscribe(Placed, group="billing")(bill)
    with pytest.raises(ConfigError, match="not an Event model"):
        app.subscribe(Add, group="billing")  # type: ignore[type-var]
    with pytest.raises(ConfigError, match="not a Task model"):
        app.handle(Placed)  # type: ignore[type-var]
    with pytest.raises(ConfigError, match="group"):
        app.subscribe(Placed, group="a.b")
