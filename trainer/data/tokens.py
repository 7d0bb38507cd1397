"""Examples become ``input_ids`` and ``labels``, with the base model's own tokenizer and
chat template.

``tokenize`` is the one place an example becomes ``input_ids`` and ``labels`` (-100 where
no loss): the recipe trains on exactly these rows (TRL takes them pre-tokenized), and the
report (``trainer.data.report``) describes exactly these rows.

    messages           the chat template renders the conversation; the tokens of each
                       assistant turn of weight 1 (as the template renders that turn,
                       end-of-turn token included) carry loss
    prompt_completion  prompt tokens, then completion tokens + EOS; loss on the latter
    text               text tokens + EOS; loss on all of them

An assistant turn is found by rendering the conversation up to it with the generation
prompt and through it: the characters in between are the turn. A template that renders
earlier turns differently once later ones follow cannot be read this way and is refused.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import JobSpec
from trainer.data.examples import LineError, Row
from trainer.errors import FailedPrecondition


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int]
    turns_without_end: int = 0  # labelled turns (or the text) with no end token among labels


def end_token_ids(tok: Any, base_dir: str | Path | None = None) -> set[int]:
    """Tokens that end a generation: the tokenizer's EOS and the base's generation config's."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if base_dir is not None:
        try:
            gen = json.loads((Path(base_dir) / "generation_config.json").read_text())
        except (OSError, ValueError):
            gen = {}
        eos = gen.get("eos_token_id")
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return ids


def _render(tok: Any, msgs: list[Row], generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in msgs],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def _assistant_spans(row: Row, tok: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its turns that carry loss."""
    msgs = row["messages"]
    full = _render(tok, msgs, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        before = _render(tok, msgs[:i], True)
        through = full if i == len(msgs) - 1 else _render(tok, msgs[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise LineError(
                "the chat template renders earlier turns differently once later turns "
                "follow, so the assistant's tokens cannot be told apart"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _label_spans(
    ids: list[int], starts: list[int], spans: list[tuple[int, int]], ends: set[int]
) -> Tokens:
    """Labels on the tokens that start inside a span; count spans that train no end token."""
    labels = [-100] * len(ids)
    without_end = 0
    for a, b in spans:
        i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        labels[i:j] = ids[i:j]
        without_end += ends.isdisjoint(ids[i:j])
    return Tokens(ids, labels, without_end)


def _encode(tok: Any, texts: list[str], special: bool = True) -> list[tuple[list[int], list[int]]]:
    """(ids, start offset of each token) per text, straight from the Rust tokenizer."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=special)
        return [(e.ids, [o[0] for o in e.offsets]) for e in encs]
    enc = tok(texts, add_special_tokens=special, return_offsets_mapping=True)
    return [
        (list(ids), [o[0] for o in offs])
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def tokenize_batch(
    rows: list[Row], kind: str, tok: Any, ends: set[int]
) -> list[Tokens | LineError]:
    """``tokenize`` for many rows at once: one call into the (Rust, parallel) tokenizer."""
    if kind == "messages":
        out: list[Tokens | LineError] = []
        rendered: list[tuple[int, str, list[tuple[int, int]]]] = []
        for n, row in enumerate(rows):
            try:
                full, spans = _assistant_spans(row, tok)
            except (LineError, ValueError, TypeError) as e:  # the template refused it
                out.append(LineError(f"the chat template cannot render it ({e})"))
                continue
            out.append(LineError("unreachable"))
            rendered.append((n, full, spans))
        encoded = _encode(tok, [full for _, full, _ in rendered], special=False)
        for (n, _, spans), (ids, starts) in zip(rendered, encoded, strict=True):
            out[n] = _label_spans(ids, starts, spans, ends)
        return out
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    results: list[Tokens | LineError] = []
    if kind == "prompt_completion":
        prompts = _encode(tok, [r["prompt"] for r in rows])
        completions = _encode(tok, [r["completion"] for r in rows], special=False)
        for (prompt, _), (completion, _) in zip(prompts, completions, strict=True):
            completion = completion + eos
            ids, labels = prompt + completion, [-100] * len(prompt) + completion
            results.append(Tokens(ids, labels, 0 if any(t in ends for t in labels) else 1))
    else:
        for ids, _ in _encode(tok, [r["text"] for r in rows]):
            ids = ids + eos
            results.append(Tokens(ids, list(ids), 0 if any(t in ends for t in ids) else 1))
    return results


def tokenize(row: Row, kind: str, tok: Any, ends: set[int]) -> Tokens:
    """``input_ids`` and ``labels`` of one canonical row (see ``trainer.data.examples``)."""
    [t] = tokenize_batch([row], kind, tok, ends)
    if isinstance(t, LineError):
        raise t
    return t


def special_tokens(tok: Any) -> list[str]:
    """Special tokens as text (BOS, EOS, headers, ...), longest first."""
    found = set(tok.all_special_tokens)
    found.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def load_tokenizer(path: str | Path) -> Any:
    """The base model's tokenizer as the job uses it (padding falls back to EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_tokenizer(spec: JobSpec) -> Any:
    """The tokenizer of the job's base model; FailedPrecondition if it cannot be loaded.

    The base model is the operator's (a folder without tokenizer files, say), not the
    tenant's input: the message names the model, never its folder on this host; the
    cause, with the folder, stays chained for the log.
    """
    try:
        return load_tokenizer(spec.base_model_path)
    except Exception as e:
        raise FailedPrecondition(
            f"base model {spec.base_model!r}: its tokenizer cannot be loaded "
            f"({type(e).__name__}); the service's operator must repair the model's files"
        ) from e
