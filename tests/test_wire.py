import pytest

from taskframe import _wire as wire


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.TF_ns_q.workers.3.17.9.1764300000000000000.42",
        "$JS.ACK.hub.ACCHASH.TF_ns_q.workers.3.17.9.1764300000000000000.42.token",
    ],
)
def test_delivery_reads_both_ack_subject_forms(reply: str) -> None:
    assert wire.delivery(reply) == (3, 17, 42)


def test_new_task_ids_are_uuid7_and_sort_by_time() -> None:
    import uuid

    ids = [wire.new_task_id() for _ in range(3)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 3


def test_a_key_is_the_task_id_and_the_message_id() -> None:
    assert wire.task_headers("order-x") == {wire.MSG_ID: "order-x"}


def test_message_id_prefers_tf_id_then_msg_id() -> None:
    assert wire.message_id({wire.ID: "x", wire.MSG_ID: "y"}, "z") == "x"
    assert wire.message_id({wire.MSG_ID: "y"}, "z") == "y"
    assert wire.message_id(None, "z") == "z"
