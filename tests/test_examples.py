"""Dataset files through the real upload path: the formats accepted, and a corpus of broken
files each refused with exactly the expected errors and line numbers, nothing stored.

One trainer service (a real process, real gRPC) serves the module; every case uploads a
file the way a client does and reads the status code and message it gets back.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant
from trainer.data.examples import MAX_LINE_BYTES, scan
from trainer.errors import InvalidArgument


def chat(*turns: tuple[str, str] | tuple[str, str, object]) -> str:
    msgs = []
    for t in turns:
        m = {"role": t[0], "content": t[1]}
        if len(t) == 3:
            m["weight"] = t[2]
        msgs.append(m)
    return json.dumps({"messages": msgs})


GOOD = chat(("user", "hi"), ("assistant", "hello"))
FORMATS = "the formats are {'messages'}, {'prompt', 'completion'}, {'text'} and " + (
    "{'instruction', 'input' (optional), 'output'}"
)
ALTERNATE = (
    "after an optional system turn, user and assistant turns must alternate, starting with user"
)


def bad_line_4(line: str | bytes) -> bytes:
    """Ten good examples, a blank line 3, and ``line`` as line 4."""
    raw = line if isinstance(line, bytes) else line.encode()
    good = GOOD.encode() + b"\n"
    return good * 2 + b"\n" + raw + b"\n" + good * 8


# (case, file bytes, the whole message after "dataset: ")
BROKEN = [
    (
        "not json",
        bad_line_4("{not json"),
        "line 4: not JSON (Expecting property name enclosed in double quotes at column 2)",
    ),
    ("not an object", bad_line_4("[1, 2]"), "line 4: not a JSON object (got list)"),
    (
        "unknown key",
        bad_line_4(json.dumps({**json.loads(GOOD), "id": 7})),
        f"line 4: unknown key(s) 'id' for the messages format; {FORMATS}",
    ),
    (
        "missing key",
        bad_line_4(json.dumps({"prompt": "2+2?"})),
        f"line 4: missing key(s) 'completion' for the prompt_completion format; {FORMATS}",
    ),
    (
        "missing alpaca output",
        bad_line_4(json.dumps({"instruction": "Add", "input": "2+2"})),
        f"line 4: missing key(s) 'output' for the alpaca format; {FORMATS}",
    ),
    (
        "wrong type",
        bad_line_4(json.dumps({"messages": [{"role": "user", "content": 3}]})),
        "line 4: messages[0].content must be a string, got int",
    ),
    (
        "messages not a list",
        bad_line_4(json.dumps({"messages": "hello"})),
        "line 4: 'messages' must be a non-empty list",
    ),
    (
        "unknown role",
        bad_line_4(chat(("user", "hi"), ("robot", "beep"))),
        "line 4: messages[1].role 'robot' is not one of system, user, assistant",
    ),
    (
        "no assistant turn",
        bad_line_4(chat(("system", "be kind"), ("user", "hi"))),
        "line 4: no assistant turn: nothing to learn from",
    ),
    (
        "empty content",
        bad_line_4(chat(("user", "hi"), ("assistant", "  "))),
        "line 4: messages[1].content is empty",
    ),
    (
        "roles not alternating",
        bad_line_4(chat(("user", "hi"), ("user", "hello?"), ("assistant", "yes"))),
        f"line 4: messages[1].role is 'user' after 'user': {ALTERNATE}",
    ),
    (
        "assistant first",
        bad_line_4(chat(("assistant", "I start"), ("user", "ok"))),
        f"line 4: messages[0].role is 'assistant' after the start: {ALTERNATE}",
    ),
    (
        "weight not 0/1",
        bad_line_4(chat(("user", "hi"), ("assistant", "hello", 0.5))),
        "line 4: messages[1].weight must be 0 or 1, got 0.5",
    ),
    (
        "weight as a boolean",
        bad_line_4(chat(("user", "hi"), ("assistant", "hello", True))),
        "line 4: messages[1].weight must be 0 or 1, got True",
    ),
    (
        "weight on a user turn",
        bad_line_4(chat(("user", "hi", 1), ("assistant", "hello"))),
        "line 4: messages[0].weight is allowed on assistant turns only, not on user",
    ),
    (
        "every assistant turn weight 0",
        bad_line_4(chat(("user", "hi"), ("assistant", "hello", 0))),
        "line 4: every assistant turn has weight 0: nothing to learn from",
    ),
    (
        "mixed formats",
        bad_line_4(json.dumps({"text": "plain text"})),
        "line 4: a text example in a messages file (its format is set by line 1): "
        "use one format per file",
    ),
    (
        "not UTF-8",
        bad_line_4(b'{"text": "caf\xe9"}'),
        "line 4: not UTF-8 (byte 14 of the line)",
    ),
    (
        "line over the size cap",
        bad_line_4(json.dumps({"text": "x" * MAX_LINE_BYTES})),
        f"line 4: line is {MAX_LINE_BYTES + 13} bytes; at most {MAX_LINE_BYTES}",
    ),
]
# Summaries: how many lines were bad, of how many.
SUMMARY = {case: "1 bad line(s) of 11: " for case, _, _ in BROKEN}

WHOLE_FILE = [
    ("empty file", b"", "the file is empty: no examples"),
    ("blank lines only", b"\n\n  \n", "the file is empty: no examples"),
    (
        "too few examples",
        (GOOD + "\n").encode() * 3,
        "3 example(s); at least 10 are needed to train",
    ),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    svc = Service(data_dir=data, base_models={}).start()
    key = add_tenant(data, "acme")
    yield svc, svc.client(key), data
    svc.stop()


def upload(client, path: Path, name: str) -> pb.Dataset:
    return client.upload_dataset(path, name)


def refused(service, tmp_path: Path, body: bytes, name: str = "broken") -> str:
    """Upload ``body``; check it is refused and that nothing was stored; return the message."""
    _, client, data = service
    path = tmp_path / f"{name}.{'parquet' if body[:4] == b'PAR1' else 'jsonl'}"
    path.write_bytes(body)
    before = {p.name for p in (data / "datasets").iterdir()}
    with pytest.raises(grpc.RpcError) as info:
        upload(client, path, name)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert name not in {d.name for d in client.list_datasets()}
    assert {p.name for p in (data / "datasets").iterdir()} == before
    assert list((data / "tmp").iterdir()) == []
    return info.value.details()


@pytest.mark.parametrize(("case", "body", "message"), BROKEN, ids=[c for c, _, _ in BROKEN])
def test_broken_line_is_refused_with_its_line(service, tmp_path, case, body, message):
    assert refused(service, tmp_path, body) == "dataset: " + SUMMARY[case] + message


@pytest.mark.parametrize(("case", "body", "message"), WHOLE_FILE, ids=[c for c, _, _ in WHOLE_FILE])
def test_broken_file_is_refused(service, tmp_path, case, body, message):
    assert refused(service, tmp_path, body) == f"dataset: {message}"


def test_many_bad_lines_list_ten_and_count_the_rest(service, tmp_path):
    lines = [GOOD] * 12 + ["{oops"] * 25  # bad lines 13..37
    details = refused(service, tmp_path, "\n".join(lines).encode())
    listed = [
        f"line {n}: not JSON (Expecting property name enclosed in double quotes at column 2)"
        for n in range(13, 23)
    ]
    assert details == "dataset: 25 bad line(s) of 37: " + "; ".join(listed) + "; and 15 more"


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_each_format_is_detected_and_stored(service, tmp_path):
    _, client, _ = service
    n = 10
    files = {
        "messages": "\n".join(
            [
                chat(
                    ("system", "brief"),
                    ("user", "hi"),
                    ("assistant", "yo", 0),
                    ("user", "again"),
                    ("assistant", "hello", 1),
                )
            ]
            * n
        ),
        "prompt_completion": "\n".join([json.dumps({"prompt": "2+2=", "completion": "4"})] * n),
        "text": "\n".join([json.dumps({"text": "Once upon a time."})] * n),
        "alpaca": "\n".join(
            [json.dumps({"instruction": "Add", "input": "2+2", "output": "4"})] * 5
            + [json.dumps({"instruction": "Say hi", "output": "hi"})] * 5
        ),
    }
    enum = {
        "messages": pb.DATASET_FORMAT_MESSAGES,
        "prompt_completion": pb.DATASET_FORMAT_PROMPT_COMPLETION,
        "text": pb.DATASET_FORMAT_TEXT,
        "alpaca": pb.DATASET_FORMAT_ALPACA,
    }
    for fmt, body in files.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(body + "\n")
        ds = upload(client, path, f"ok-{fmt}")
        assert (ds.format, ds.num_rows, ds.file_type) == (enum[fmt], n, "jsonl")

    # Parquet with the same columns: an absent optional column value is a null.
    rows = [
        {"instruction": "Add", "input": None if i % 2 else "2+2", "output": "4"} for i in range(12)
    ]
    ds = upload(client, write_parquet(tmp_path / "alpaca.parquet", rows), "ok-parquet")
    assert (ds.format, ds.num_rows, ds.file_type) == (pb.DATASET_FORMAT_ALPACA, 12, "parquet")
    msgs = [
        {
            "messages": [
                {"role": "user", "content": "hi", "weight": None},
                {"role": "assistant", "content": "yo", "weight": 1},
            ]
        }
    ] * 10
    ds = upload(client, write_parquet(tmp_path / "chat.parquet", msgs), "ok-parquet-chat")
    assert (ds.format, ds.file_type) == (pb.DATASET_FORMAT_MESSAGES, "parquet")


def test_broken_parquet_names_its_row(service, tmp_path):
    rows = [{"prompt": "q", "completion": "a"}] * 11
    rows[6] = {"prompt": "q", "completion": ""}
    body = write_parquet(tmp_path / "source.parquet", rows).read_bytes()
    details = refused(service, tmp_path, body, "bad-parquet")
    assert details == "dataset: 1 bad row(s) of 11: row 7: 'completion' is empty"


def test_truncated_parquet_is_refused(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [{"text": "hello"}] * 20)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(InvalidArgument, match="not a readable Parquet file"):
        scan(path, min_examples=1)
