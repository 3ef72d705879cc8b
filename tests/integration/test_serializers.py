"""Serializers: ``bytes`` (the default), ``json`` and custom objects, through push,
push_many, batches, schedules, the handler's ``job.data``, ``Task.get`` and the CLI.
A value the serializer cannot write is a PayloadError naming its type and where it is,
and nothing is written."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from support.backends import TaskFactory, unique_task_id
from support.helpers import record

from meepo import ConfigError, Job, PayloadError, Status, Task
from meepo.cli import main
from meepo.serializers import JSON, encode, encode_result, serializer_for

pytestmark = pytest.mark.timeout(120)


class Zipped:
    """A custom serializer: JSON, deflated."""

    def dumps(self, value: Any) -> bytes:
        return zlib.compress(json.dumps(value).encode())

    def loads(self, data: bytes) -> Any:
        return json.loads(zlib.decompress(data))


def _count(task: Task) -> int:
    return len(task.ledger.find(task_id=task.task_id))


# -- the json serializer, no I/O ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"items": [1, 2, 3, {4}]}, 'payload["items"][3]: set is not JSON'),
        ({"a": {"b": b"raw"}}, 'payload["a"]["b"]: bytes is not JSON'),
        ([1.5, float("nan")], "payload[1]: float nan is not JSON"),
        ({1: "x"}, "payload: key 1 is int, not str"),
        (object(), "payload: object is not JSON"),
        ({"é": [None, True, {"t": (1, {"deep": 1j})}]}, 'payload["é"][2]["t"][1]["deep"]: complex'),
    ],
)
def test_json_names_the_type_and_path_of_a_bad_value(value: Any, message: str) -> None:
    with pytest.raises(PayloadError) as info:
        encode(JSON, value, "payload")
    assert message in str(info.value)


def test_json_refuses_a_value_that_contains_itself() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(PayloadError, match="nested more than 500 levels deep"):
        encode(JSON, loop, "payload")


def test_json_writes_compact_utf8_as_meepo_push_json_does() -> None:
    assert encode(JSON, {"a": [1, "é"], "b": None}, "payload") == '{"a":[1,"é"],"b":null}'.encode()
    assert encode(JSON, ("t", 1), "payload") == b'["t",1]'


def test_a_bad_serializer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'bytes', 'json' or an object"):
        serializer_for("pickle")
    with pytest.raises(ConfigError, match="not int"):
        serializer_for(3)
    assert serializer_for("json") is JSON


def test_a_custom_serializers_failures_are_payload_errors() -> None:
    class Broken:
        def dumps(self, value: Any) -> Any:
            if value == "raise":
                raise RuntimeError("cannot")
            return "text, not bytes"

        def loads(self, data: bytes) -> Any:
            return data

    with pytest.raises(PayloadError, match=r"payload: Broken\.dumps raised RuntimeError: cannot"):
        encode(Broken(), "raise", "payload")
    with pytest.raises(PayloadError, match=r"payload: Broken\.dumps returned str, not bytes"):
        encode(Broken(), "x", "payload")
    with pytest.raises(PayloadError, match="result must be bytes or str"):
        encode_result(serializer_for("bytes"), {"a": 1})


# -- through a task ----------------------------------------------------------------------


def test_json_payloads_round_trip_through_every_push(make_task: TaskFactory) -> None:
    seen: dict[int, Any] = {}

    def handler(job: Job) -> None:
        assert isinstance(job.payload, bytes)
        seen[job.id] = job.data

    task = make_task(job_func=handler, serializer="json")
    one = task.push({"url": "https://example.org", "n": [1, 2.5, None, True]})
    many = task.push_many(["text", 3, [], {"k": {}}])
    with task.batch() as b:
        b.push({"in": "batch"}, priority="default")
    values = [
        {"url": "https://example.org", "n": [1, 2.5, None, True]},
        "text",
        3,
        [],
        {"k": {}},
        {"in": "batch"},
    ]
    ids = [one, *many, *b.ids]
    rec = record(task, one)
    assert rec.payload == b'{"url":"https://example.org","n":[1,2.5,null,true]}'
    assert rec.data == values[0]  # Task.get decodes
    task.start()
    for i in ids:
        assert task.wait(i, timeout=30).status is Status.DONE
    assert [seen[i] for i in ids] == values


def test_a_bad_json_payload_writes_nothing(make_task: TaskFactory) -> None:
    task = make_task(serializer="json")
    task.push({"ok": 1})
    with pytest.raises(PayloadError, match=r'payload\["items"\]\[3\]: set is not JSON'):
        task.push({"items": [0, 1, 2, {3}]})
    with pytest.raises(PayloadError, match=r"payloads\[2\]: bytes is not JSON"):
        task.push_many([1, 2, b"three", 4])
    with pytest.raises(PayloadError, match="set is not JSON"), task.batch() as b:
        b.push({"fine": True})
        b.push({"bad": {1}})
    with pytest.raises(PayloadError, match="set is not JSON"):
        task.schedule_every("s", 60, {"bad": set()})
    assert _count(task) == 1
    assert task.schedules() == []


def test_the_bytes_serializer_keeps_refusing_what_is_not_bytes(make_task: TaskFactory) -> None:
    task = make_task()
    with pytest.raises(TypeError, match="payload must be bytes, not dict"):
        task.push({"a": 1})
    with pytest.raises(TypeError, match="payload #1 must be bytes, not str"):
        task.push_many([b"a", "b"])
    assert task.push(bytearray(b"ok")) > 0
    assert _count(task) == 1


def test_json_payloads_over_max_payload_bytes_are_refused(make_task: TaskFactory) -> None:
    task = make_task(serializer="json", max_payload_bytes=20)
    with pytest.raises(PayloadError, match="payload of 22 bytes exceeds max_payload_bytes=20"):
        task.push({"x": "y" * 14})
    assert _count(task) == 0


def test_a_custom_serializer_round_trips_payloads_and_results(make_task: TaskFactory) -> None:
    def handler(job: Job) -> Any:
        return {"echo": job.data}

    task = make_task(job_func=handler, serializer=Zipped(), store_results=True)
    job_id = task.push({"big": "z" * 1000})
    assert len(record(task, job_id).payload) < 100  # deflated
    task.start()
    rec = task.wait(job_id, timeout=30)
    assert rec.data == {"big": "z" * 1000}
    assert rec.result == {"echo": {"big": "z" * 1000}}


def test_a_payload_the_serializer_cannot_read_stays_bytes_in_get(make_task: TaskFactory) -> None:
    raw = make_task()  # bytes: writes anything
    job_id = raw.push(b"\xff not json")
    as_json = make_task(raw.task_id, serializer="json")
    assert record(as_json, job_id).data == b"\xff not json"


# -- the CLI -----------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, _ = capsys.readouterr()
    return code, out


def test_the_cli_shows_json_payloads_and_results_as_json(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str, redis_url: str
) -> None:
    task_id = unique_task_id("cli")
    code, out = _run(
        capsys, "push", task_id, "--json", '{"url": "https://example.org", "n": [1, 2]}',
        "--db", db_url, "--redis", redis_url,
    )  # fmt: skip
    assert code == 0
    job_id = int(out.split()[2])

    def handler(job: Job) -> Any:
        return {"fetched": job.data["url"], "ok": True}

    task = make_task(task_id, job_func=handler, serializer="json", store_results=True)
    task.start()
    assert task.wait(job_id, timeout=30).result == {"fetched": "https://example.org", "ok": True}

    code, out = _run(capsys, "jobs", "show", str(job_id), "--db", db_url)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["payload:"] == '{"url": "https://example.org", "n": [1, 2]} (39 bytes, JSON)'
    assert fields["result:"] == '{"fetched": "https://example.org", "ok": true} (43 bytes, JSON)'

    code, out = _run(capsys, "jobs", "list", "--task", task_id, "--json", "--db", db_url)
    assert code == 0
    (row,) = json.loads(out)["jobs"]
    assert row["data"] == {"url": "https://example.org", "n": [1, 2]}
    assert row["payload_is_json"] is True
    assert row["result"] == {"fetched": "https://example.org", "ok": True}
    assert row["result_size"] == 43


def test_the_cli_shows_other_payloads_as_text(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str
) -> None:
    task = make_task()
    job_id = task.push(b"plain \xff")
    code, out = _run(capsys, "jobs", "show", str(job_id), "--json", "--db", db_url)
    data = json.loads(out)
    assert code == 0 and data["data"] is None and data["payload_is_json"] is False
    assert data["result"] is None and data["result_size"] is None
