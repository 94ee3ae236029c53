from typing import Any

import pytest

from taskframe import ConfigError, Event, Task
from taskframe.models import result_type


class Resize(Task[str], queue="images", name="resize-image"):
    url: str


class Plain(Task):  # type: ignore[type-arg]
    x: int = 0


def test_class_options_are_read_from_keywords() -> None:
    assert Resize.__tf_queue__ == "images"
    assert Resize.__tf_name__ == "resize-image"
    assert Resize.__tf_results__ is True
    assert Plain.__tf_queue__ == "default"
    assert Plain.__tf_name__ == "Plain"


def test_result_type_comes_from_the_generic_parameter() -> None:
    assert result_type(Resize) is str
    assert result_type(Plain) is Any


def test_subclass_inherits_queue_but_not_name() -> None:
    class Bigger(Resize):
        width: int = 1024

    assert Bigger.__tf_queue__ == "images"
    assert Bigger.__tf_name__ == "Bigger"


@pytest.mark.parametrize("queue", ["a.b", "has space", "x>", "*", ""])
def test_queue_must_be_one_subject_token(queue: str) -> None:
    with pytest.raises(ConfigError, match="subject token"):

        class Bad(Task[None], queue=queue):
            pass


def test_reserved_queue_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="reserved"):

        class Bad(Task[None], queue="DEAD"):
            pass


def test_event_names_may_have_dots() -> None:
    class ImageResized(Event, name="image.resized"):
        url: str

    assert ImageResized.__tf_name__ == "image.resized"
    with pytest.raises(ConfigError):

        class Bad(Event, name="image..resized"):
            pass


def test_models_are_immutable_values() -> None:
    job = Resize(url="a")
    with pytest.raises(ValueError, match="frozen"):
        job.url = "b"  # type: ignore[misc]
