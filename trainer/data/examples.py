"""Dataset files as examples: the formats users bring, read and checked line by line.

One format per file, detected from the first good line and reported:

    messages           {"messages": [{"role", "content", "weight"?}, ...]}
    prompt_completion  {"prompt", "completion"}
    text               {"text"}
    alpaca             {"instruction", "input"?, "output"}  -> a user and an assistant turn

A file is JSONL (UTF-8, one object per line) or Parquet with the same columns (a null
optional column counts as absent). ``scan`` reads a whole file and raises one
``InvalidArgument`` that lists the first problems with their line numbers (rows, for
Parquet) and how many lines are bad in all; ``examples`` then yields each line as a
canonical row for tokenizing: messages (alpaca converted, weights filled in),
prompt/completion or text. Nothing here needs torch: the upload path and the offline
``finetune datasets validate`` use it as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import InvalidArgument

MAX_ERRORS_LISTED = 10
MAX_LINE_BYTES = 4 << 20
ROLES = ("system", "user", "assistant")
PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024

Row = dict[str, Any]


class LineError(ValueError):
    """One example is wrong; the message says how (the caller adds the line)."""


def _string(obj: Row, key: str, name: str | None = None) -> str:
    """``obj[key]`` if it is a string with some text; ``name`` is how errors call it."""
    value, name = obj[key], name or repr(key)
    if not isinstance(value, str):
        raise LineError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LineError(f"{name} is empty")
    return value


_MESSAGE_KEYS = frozenset({"role", "content", "weight"})
_NEXT_ROLES = {"system": ("user",), "user": ("assistant",), "assistant": ("user",)}


def _message(i: int, m: Any, expected: tuple[str, ...], previous: str | None) -> Row:
    """One turn of a conversation, checked; raises ``LineError`` naming ``messages[i]``."""
    at = f"messages[{i}]"
    if not isinstance(m, dict):
        raise LineError(f"{at} must be an object, got {type(m).__name__}")
    if m.get("weight", 0) is None:  # a Parquet null: absent
        m = {k: v for k, v in m.items() if k != "weight"}
    if not m.keys() <= _MESSAGE_KEYS:
        unknown = sorted(m.keys() - _MESSAGE_KEYS)
        raise LineError(f"{at} has unknown key(s) {', '.join(map(repr, unknown))}")
    if "role" not in m or "content" not in m:
        missing = [k for k in ("role", "content") if k not in m]
        raise LineError(f"{at} is missing {', '.join(map(repr, missing))}")
    role = m["role"]
    if role not in _NEXT_ROLES:
        raise LineError(f"{at}.role {role!r} is not one of {', '.join(ROLES)}")
    content = _string(m, "content", f"{at}.content")
    if role not in expected:
        after = repr(previous) if previous else "the start"
        raise LineError(
            f"{at}.role is {role!r} after {after}: after an optional system turn, "
            "user and assistant turns must alternate, starting with user"
        )
    weight = m.get("weight", 1)
    if "weight" in m and role != "assistant":
        raise LineError(f"{at}.weight is allowed on assistant turns only, not on {role}")
    if type(weight) is not int or weight not in (0, 1):
        raise LineError(f"{at}.weight must be 0 or 1, got {weight!r}")
    return {"role": role, "content": content, "weight": weight}


def _messages(obj: Row) -> Row:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LineError("'messages' must be a non-empty list")
    out: list[Row] = []
    expected: tuple[str, ...] = ("system", "user")  # optional system, then user/assistant
    previous: str | None = None
    learns = seen_assistant = False
    for i, m in enumerate(msgs):
        turn = _message(i, m, expected, previous)
        previous = turn["role"]
        expected = _NEXT_ROLES[previous]
        if previous == "assistant":
            seen_assistant = True
            learns = learns or turn["weight"] == 1
        out.append(turn)
    if not seen_assistant:
        raise LineError("no assistant turn: nothing to learn from")
    if not learns:
        raise LineError("every assistant turn has weight 0: nothing to learn from")
    return {"messages": out}


def _alpaca(obj: Row) -> Row:
    instruction = _string(obj, "instruction")
    output = _string(obj, "output")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise LineError(f"'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {
        "messages": [
            {"role": "user", "content": prompt, "weight": 1},
            {"role": "assistant", "content": output, "weight": 1},
        ]
    }


def _prompt_completion(obj: Row) -> Row:
    return {"prompt": _string(obj, "prompt"), "completion": _string(obj, "completion")}


def _text(obj: Row) -> Row:
    return {"text": _string(obj, "text")}


@dataclass(frozen=True)
class Format:
    """One row shape: the keys that identify it and how a row becomes a canonical one."""

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    canonical: Callable[[Row], Row]
    kind: str  # how it is tokenized: "messages", "prompt_completion" or "text"

    def keys_problem(self, keys: set[str]) -> str | None:
        unknown = sorted(keys - self.required - self.optional)
        missing = sorted(self.required - keys)
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown key(s) {', '.join(map(repr, unknown))}")
        return f"{' and '.join(parts)} for the {self.name} format" if parts else None


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("messages", frozenset({"messages"}), frozenset(), _messages, "messages"),
        Format(
            "prompt_completion",
            frozenset({"prompt", "completion"}),
            frozenset(),
            _prompt_completion,
            "prompt_completion",
        ),
        Format("text", frozenset({"text"}), frozenset(), _text, "text"),
        Format(
            "alpaca",
            frozenset({"instruction", "output"}),
            frozenset({"input"}),
            _alpaca,
            "messages",
        ),
    )
}


_OPTIONAL = frozenset().union(*(f.optional for f in FORMATS.values()))


def _closest(keys: set[str]) -> Format:
    """The format a row with wrong keys was most likely meant to be."""
    return max(
        FORMATS.values(), key=lambda f: (len(keys & (f.required | f.optional)), -len(f.required))
    )


def detect(obj: Any) -> Format:
    """The format whose keys ``obj`` has exactly (optional keys may be absent)."""
    if not isinstance(obj, dict):
        raise LineError(f"not a JSON object (got {type(obj).__name__})")
    keys = {k for k, v in obj.items() if v is not None or k not in _OPTIONAL}
    for f in FORMATS.values():
        if f.keys_problem(keys) is None:
            return f
    problem = _closest(keys).keys_problem(keys)
    raise LineError(
        f"{problem}; the formats are {{'messages'}}, {{'prompt', 'completion'}}, {{'text'}} "
        "and {'instruction', 'input' (optional), 'output'}"
    )


# ---------------------------------------------------------------- reading files


def file_type(path: Path) -> str:
    with open(path, "rb") as f:
        return "parquet" if f.read(4) == PARQUET_MAGIC else "jsonl"


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed object or LineError); blank lines are skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield lineno, LineError(f"line is {len(raw)} bytes; at most {MAX_LINE_BYTES}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, LineError(f"not UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, LineError(f"not JSON ({e.msg} at column {e.colno})")


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(row, dict); rows are numbered from 1 like lines."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InvalidArgument("dataset", f"not a readable Parquet file ({e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def records(path: Path) -> Iterator[tuple[int, Any]]:
    """Every example of a JSONL or Parquet file as (line, object or LineError)."""
    return _parquet_records(path) if file_type(path) == "parquet" else _jsonl_records(path)


def _rows(path: Path) -> Iterator[tuple[int, Format | None, Row | LineError]]:
    """(line, the line's format, canonical row or LineError), formats not yet compared."""
    for line, obj in records(path):
        if isinstance(obj, LineError):
            yield line, None, obj
            continue
        try:
            fmt = detect(obj)
            yield line, fmt, fmt.canonical(obj)
        except LineError as e:
            yield line, None, e


# ---------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Scan:
    """What a structurally valid file holds."""

    format: str
    file_type: str
    examples: int


def scan(path: Path, min_examples: int, max_errors: int = MAX_ERRORS_LISTED) -> Scan:
    """Check every line; raise ``InvalidArgument`` listing what is wrong and where.

    ``min_examples``: an upload passes the service's (``ServiceConfig.min_examples``); a
    dataset already stored, read again, passes 1.

    Reads the file once, streaming: memory does not grow with its size.
    """
    kind = file_type(path)
    unit = "row" if kind == "parquet" else "line"
    fmt: Format | None = None
    first_line = 0
    count = 0
    errors: list[str] = []
    bad = 0
    for line, row_fmt, row in _rows(path):
        problem: str | None = str(row) if isinstance(row, LineError) else None
        if problem is None and row_fmt is not None:
            if fmt is None:
                fmt, first_line = row_fmt, line
            elif row_fmt is not fmt:
                problem = (
                    f"a {row_fmt.name} example in a {fmt.name} file (its format is set by "
                    f"{unit} {first_line}): use one format per file"
                )
        if problem is None:
            count += 1
            continue
        bad += 1
        if len(errors) < max_errors:
            errors.append(f"{unit} {line}: {problem}")
    if bad:
        more = f"; and {bad - len(errors)} more" if bad > len(errors) else ""
        raise InvalidArgument(
            "dataset", f"{bad} bad {unit}(s) of {count + bad}: " + "; ".join(errors) + more
        )
    if fmt is None:
        raise InvalidArgument("dataset", "the file is empty: no examples")
    if count < min_examples:
        raise InvalidArgument(
            "dataset", f"{count} example(s); at least {min_examples} are needed to train"
        )
    return Scan(format=fmt.name, file_type=kind, examples=count)


def examples(path: Path, fmt: str) -> Iterator[tuple[int, Row]]:
    """The canonical rows of a file ``scan`` accepted as ``fmt``, with their lines."""
    want = FORMATS[fmt]
    for line, row_fmt, row in _rows(path):
        if isinstance(row, LineError) or row_fmt is not want:
            raise InvalidArgument("dataset", f"line {line}: changed since it was checked")
        yield line, row
