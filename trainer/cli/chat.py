"""``finetune chat ADAPTER``: talk to an adapter through the OpenAI-compatible endpoint.

The answer streams in as vLLM produces it (server-sent events of
``/v1/chat/completions``); the conversation is kept, so each turn sees the ones
before. The API key is the tenant's key, the same one the trainer takes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves"


class ChatError(Exception):
    """The endpoint refused or could not be reached; ``status`` is the HTTP status or 0."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChatSession:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        timeout: float = 120.0,
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self.model = model
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def close(self) -> None:
        self.http.close()

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text`` piece by piece; the turn is kept once complete."""
        self.messages.append({"role": "user", "content": text})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        answer: list[str] = []
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ChatError(r.status_code, _error_text(r))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            answer.append(piece)
                            yield piece
        except httpx.HTTPError as e:
            self.messages.pop()
            raise ChatError(0, f"{type(e).__name__}: {e}") from e
        except ChatError:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(answer)})


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json()
        msg = err.get("error", err)
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return f"HTTP {r.status_code}: {msg}"
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"


def repl(session: ChatSession, stdin: TextIO, out: TextIO, interactive: bool) -> None:
    """Read a turn a line, print each answer as it streams; stops at EOF or /exit."""
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chatting with {session.model}; {HELP}", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ") + "\n"
            except EOFError:
                out.write("\n")
                return
        else:
            line = stdin.readline()
            if not line:
                return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        for piece in session.ask(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
