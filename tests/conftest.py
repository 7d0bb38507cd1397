"""Shared fixtures: the tiny base model (built once a session) and small datasets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bf16 Llama with its trained BPE tokenizer and chat template (read-only!)."""
    from trainer.dev.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


def chat_row(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_chat_dataset(path: Path, pairs: Iterable[tuple[str, str]], repeat: int = 1) -> Path:
    """A ``messages`` JSONL file: each (user, assistant) pair, ``repeat`` times over."""
    pairs = list(pairs)
    return write_jsonl(path, (chat_row(u, a) for _ in range(repeat) for u, a in pairs))


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (to prove nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# The helpers as fixtures too, so test modules need not import this conftest.
@pytest.fixture(scope="session", name="write_chat_dataset")
def _write_chat_dataset_fixture():
    return write_chat_dataset


@pytest.fixture(scope="session", name="write_jsonl")
def _write_jsonl_fixture():
    return write_jsonl


@pytest.fixture(scope="session", name="tree_hash")
def _tree_hash_fixture():
    return tree_hash
