"""What a job will train on, read with the base model's own tokenizer and chat template.

The report (``Report``) describes exactly the rows the recipe trains on (both come from
``trainer.data.tokens``), so what it says is what the job does. It is built streaming, one
example at a time: token counts per example, truncation at ``max_seq_len``, the share of
tokens that carry loss, examples with no loss left, whether the end-of-turn/EOS token is
among the labels (if not, the fine-tuned model never learns to stop: an error), special
tokens inside content, and the optimizer steps and tokens the job will train.
``python -m trainer.data.report`` is the same report in a subprocess, for ValidateDataset.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import sys
import traceback
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import events
from trainer.config import JobConfig, JobSpec
from trainer.data.examples import FORMATS, LineError, Row, examples, scan
from trainer.data.tokens import (
    Tokens,
    base_tokenizer,
    end_token_ids,
    special_tokens,
    tokenize_batch,
)
from trainer.errors import FailedPrecondition, InvalidArgument
from trainer.processes import die_with_parent

LINES_LISTED = 10
BATCH_ROWS = 256  # examples per call into the tokenizer
PACK_BATCH_ROWS = 1000  # TRL packs each batch of its dataset.map (default batch_size) apart


def _contents(row: Row) -> Iterator[str]:
    if "messages" in row:
        yield from (m["content"] for m in row["messages"])
    else:
        yield from (v for v in row.values() if isinstance(v, str))


# ---------------------------------------------------------------- the report


@dataclass
class Finding:
    severity: str  # "error" or "warning"
    code: str
    message: str
    count: int
    lines: list[int] = field(default_factory=list)


@dataclass
class Report:
    format: str
    examples: int = 0
    eval_examples: int = 0
    tokens_min: int = 0
    tokens_mean: float = 0.0
    tokens_max: int = 0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    loss_token_share: float = 0.0
    all_masked_examples: int = 0
    examples_without_eos: int = 0
    examples_with_special_tokens: int = 0
    total_steps: int = 0
    train_tokens: int = 0
    loss_tokens: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def errors(self) -> str:
        return "; ".join(f.message for f in self.findings if f.severity == "error")

    def summary(self) -> str:
        """One line: what the job will train."""
        line = (
            f"dataset: {self.examples} {self.format} examples"
            + (f" (+{self.eval_examples} eval)" if self.eval_examples else "")
            + f", {self.tokens_min}/{self.tokens_mean:.0f}/{self.tokens_max} tokens "
            f"min/mean/max, {self.loss_token_share:.0%} carry loss; {self.total_steps} steps"
        )
        problems = [f.message for f in self.findings]
        return line + ("; " + "; ".join(problems) if problems else "")

    def text(self) -> str:
        """The report for people, a figure a line, then each finding with its lines."""
        rows = [
            ("format", self.format),
            (
                "examples",
                f"{self.examples}"
                + (f" (+{self.eval_examples} eval)" if self.eval_examples else ""),
            ),
            (
                "tokens per example",
                f"{self.tokens_min} min, {self.tokens_mean:.1f} mean, {self.tokens_max} max",
            ),
            (
                "truncated",
                f"{self.truncated_examples} examples, {self.truncated_tokens} tokens cut off",
            ),
            ("tokens with loss", f"{self.loss_token_share:.1%}"),
            (
                "will train",
                f"{self.total_steps} steps, {self.train_tokens} tokens "
                f"({self.loss_tokens} with loss)",
            ),
        ]
        out = [f"{k + ':':<20}{v}" for k, v in rows]
        for f in self.findings:
            more = ", ..." if f.count > len(f.lines) else ""
            where = f" (lines {', '.join(map(str, f.lines))}{more})" if f.lines else ""
            out.append(f"{f.severity.upper()}: {f.message}{where}")
        out.append("ok" if self.ok else "refused: a job on this dataset would fail")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        d = {k: v for k, v in d.items() if k != "ok"}
        d["findings"] = [Finding(**f) for f in d.get("findings", [])]
        return cls(**d)


class _Lines:
    """A count of affected examples and the first few of their lines."""

    def __init__(self) -> None:
        self.count = 0
        self.lines: list[int] = []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.lines) < LINES_LISTED:
            self.lines.append(line)


def count_packed_rows(lengths: Iterable[int], capacity: int) -> int:
    """Rows that best-fit-decreasing packing (TRL's ``bfd``) makes of these lengths."""
    free: list[int] = []
    rows = 0
    for n in sorted(lengths, reverse=True):
        i = bisect.bisect_left(free, n)
        if i < len(free):
            room = free.pop(i) - n
        else:
            rows += 1
            room = capacity - n
        if room > 0:
            bisect.insort(free, room)
    return rows


def optimizer_steps(rows: int, cfg: JobConfig) -> int:
    """What ``transformers.Trainer`` will run: ceil(epochs x ceil(batches / accumulation))."""
    batches = math.ceil(rows / cfg.batch_size)
    per_epoch = max(math.ceil(batches / cfg.gradient_accumulation_steps), 1)
    return math.ceil(cfg.num_epochs * per_epoch)


def eval_positions(examples: int, fraction: float, seed: int) -> set[int]:
    """Which examples (0-based, in file order) go to the eval set: the same for a seed."""
    if not 0 < fraction < 1:
        raise InvalidArgument("eval_fraction", f"{fraction} is not in (0, 1)")
    k = max(1, round(examples * fraction))
    if k >= examples:
        raise InvalidArgument(
            "eval_fraction",
            f"{fraction} of {examples} example(s) leaves none to train on",
        )
    return set(random.Random(seed).sample(range(examples), k))


def build(
    fmt: str,
    rows: Iterable[tuple[int, Row]],
    tok: Any,
    cfg: JobConfig,
    *,
    ends: set[int],
    eval_rows: Iterable[tuple[int, Row]] = (),
    eval_at: set[int] | None = None,
    packing: bool = False,
    train: Callable[[Tokens], None] | None = None,
    held_out: Callable[[Tokens], None] | None = None,
) -> Report:
    """Tokenize every example once and describe what the job will train on.

    ``eval_at`` carves those positions out of ``rows`` for evaluation; ``eval_rows`` are
    a separate validation set. ``train`` and ``held_out`` receive the rows a job trains
    and evaluates on (a ``trainer.data.rows.RowFile``); memory stays flat in the number of
    examples but for one int per example for the packed step count.
    """
    kind = FORMATS[fmt].kind
    specials = special_tokens(tok)
    limit = cfg.max_seq_len
    rep = Report(format=fmt)
    truncated, masked, no_eos, special = _Lines(), _Lines(), _Lines(), _Lines()
    lengths = array("l")
    total = trained = loss = 0
    bad: list[str] = []

    def tokenized(
        pairs: Iterable[tuple[int, Row]],
    ) -> Iterator[tuple[int, int, Row, Tokens | None]]:
        """(position, line, row, tokens or None when the template refused it), in order."""
        it = iter(pairs)
        pos = 0
        while chunk := list(itertools.islice(it, BATCH_ROWS)):
            results = tokenize_batch([row for _, row in chunk], kind, tok, ends)
            for (line, row), result in zip(chunk, results, strict=True):
                tokens: Tokens | None = None
                if isinstance(result, LineError):
                    if len(bad) < LINES_LISTED:
                        bad.append(f"line {line}: {result}")
                else:
                    tokens = result
                yield pos, line, row, tokens
                pos += 1

    def evaluate_on(t: Tokens) -> None:
        """An eval example; one with no loss within max_seq_len would only add noise."""
        if any(x != -100 for x in t.labels[:limit]):
            rep.eval_examples += 1
            if held_out is not None:
                held_out(t)

    for pos, line, row, t in tokenized(rows):
        if t is None:
            continue
        if any(s in text for text in _contents(row) for s in specials):
            special.add(line)
        if t.turns_without_end:
            no_eos.add(line)
        if eval_at is not None and pos in eval_at:
            evaluate_on(t)
            continue
        n = len(t.input_ids)
        rep.examples += 1
        total += n
        rep.tokens_min = n if rep.examples == 1 else min(rep.tokens_min, n)
        rep.tokens_max = max(rep.tokens_max, n)
        if n > limit:
            truncated.add(line)
            rep.truncated_tokens += n - limit
        kept_loss = sum(1 for x in t.labels[:limit] if x != -100)
        if kept_loss == 0:
            masked.add(line)  # left out of the job's rows: it adds nothing but padding
            continue
        trained += min(n, limit)
        loss += kept_loss
        lengths.append(min(n, limit))
        if train is not None:
            train(t)
    for _, line, _, t in tokenized(eval_rows):
        if t is not None:
            if t.turns_without_end:
                no_eos.add(line)
            evaluate_on(t)
    if bad:
        raise InvalidArgument("dataset", "; ".join(bad))

    rep.tokens_mean = total / rep.examples if rep.examples else 0.0
    rep.truncated_examples = truncated.count
    rep.all_masked_examples = masked.count
    rep.examples_without_eos = no_eos.count
    rep.examples_with_special_tokens = special.count
    rep.loss_tokens = round(loss * cfg.num_epochs)
    rep.train_tokens = round(trained * cfg.num_epochs)
    rep.loss_token_share = loss / trained if trained else 0.0
    rows_trained = (
        sum(
            count_packed_rows(lengths[i : i + PACK_BATCH_ROWS], limit)
            for i in range(0, len(lengths), PACK_BATCH_ROWS)
        )
        if packing
        else len(lengths)
    )
    rep.total_steps = optimizer_steps(rows_trained, cfg) if rows_trained else 0
    rep.findings = _findings(rep, tok, ends, specials, truncated, masked, no_eos, special, limit)
    return rep


def _findings(
    rep: Report,
    tok: Any,
    ends: set[int],
    specials: list[str],
    truncated: _Lines,
    masked: _Lines,
    no_eos: _Lines,
    special: _Lines,
    limit: int,
) -> list[Finding]:
    found: list[Finding] = []
    end_names = ", ".join(sorted(str(tok.convert_ids_to_tokens(i)) for i in ends)) or "none"
    if no_eos.count:
        found.append(
            Finding(
                "error",
                "no_eos_in_labels",
                f"{no_eos.count} example(s) train no end-of-turn token ({end_names}): the "
                "chat template leaves it out of the assistant's turn, so the fine-tuned "
                "model would never learn to stop; end each assistant turn with it",
                no_eos.count,
                no_eos.lines,
            )
        )
    if rep.examples and masked.count == rep.examples:
        found.append(
            Finding(
                "error",
                "no_loss_tokens",
                f"no example keeps a token that carries loss within max_seq_len={limit}",
                masked.count,
                masked.lines,
            )
        )
    elif masked.count:
        found.append(
            Finding(
                "warning",
                "all_masked",
                f"{masked.count} example(s) keep no token that carries loss within "
                f"max_seq_len={limit}; they are left out",
                masked.count,
                masked.lines,
            )
        )
    if truncated.count:
        found.append(
            Finding(
                "warning",
                "truncated",
                f"{truncated.count} example(s) are longer than max_seq_len={limit}; "
                f"{rep.truncated_tokens} token(s) are cut off",
                truncated.count,
                truncated.lines,
            )
        )
    if special.count:
        found.append(
            Finding(
                "warning",
                "special_tokens_in_content",
                f"{special.count} example(s) write special tokens ({', '.join(specials[:6])}) "
                "inside their content; the model reads them as control tokens",
                special.count,
                special.lines,
            )
        )
    return found


# ---------------------------------------------------------------- a job's data


def for_spec(
    spec: JobSpec,
    tok: Any,
    *,
    packing: bool,
    train: Callable[[Tokens], None] | None = None,
    held_out: Callable[[Tokens], None] | None = None,
) -> Report:
    """The report of the job ``spec`` describes; its rows go to ``train``/``held_out``."""
    path = Path(spec.dataset_path)
    fmt, count = spec.dataset_format, spec.dataset_examples
    if not fmt or not count:
        found = scan(path, min_examples=1)  # stored: checked against the minimum on upload
        fmt, count = found.format, found.examples
    eval_at = (
        eval_positions(count, spec.eval_fraction, spec.config.seed) if spec.eval_fraction else None
    )
    eval_rows = examples(Path(spec.eval_dataset_path), fmt) if spec.eval_dataset_path else ()
    return build(
        fmt,
        examples(path, fmt),
        tok,
        spec.config,
        ends=end_token_ids(tok, spec.base_model_path),
        eval_rows=eval_rows,
        eval_at=eval_at,
        packing=packing,
        train=train,
        held_out=held_out,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.data.report SPEC_JSON [--packing]``: the report as an event.

    The service runs this in a subprocess for ``ValidateDataset`` so that tokenizing a
    large file neither blocks its event loop nor holds the tokenizer in its memory. It
    writes one ``trainer.events`` line: DatasetReport (exit 0), or Failed (exit 1) of kind
    user when the input is at fault, or precondition when the base model's tokenizer
    cannot be loaded (the traceback, host paths and all, goes to stderr for the log).
    """
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    spec = JobSpec.from_dict(json.loads(Path(argv[0]).read_text()))
    try:
        tok = base_tokenizer(spec)
        report = for_spec(spec, tok, packing="--packing" in argv)
    except FailedPrecondition as e:
        traceback.print_exc()
        print(events.encode(events.Failed(events.PRECONDITION, str(e))), flush=True)
        return 1
    except InvalidArgument as e:
        print(events.encode(events.Failed(events.USER, str(e))), flush=True)
        return 1
    print(events.encode(events.DatasetReport(report.to_dict())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
