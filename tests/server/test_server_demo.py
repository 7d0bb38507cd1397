"""``python -m trainer.dev.demo``, the README's one-command tour, runs and shows what it says."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.service import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_the_demo_trains_two_tenants_and_prints_their_answers(tiny_base, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.dev.demo",
            "--model",
            str(tiny_base),
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout.split("greedy, 12 tokens:")[1].splitlines()
    answers = {tuple(line.split()[:2]): line for line in table if line.strip()}
    assert set(answers) == {
        ("acme", "base"),
        ("acme", "acme/secret"),
        ("bolt", "base"),
        ("bolt", "bolt/secret"),
    }
    assert "banana" in answers["acme", "acme/secret"] and "cherry" in answers["bolt", "bolt/secret"]
    for tenant in ("acme", "bolt"):
        assert not {"banana", "cherry"} & set(answers[tenant, "base"].replace(".", " ").split())
    # Both processes were stopped: nothing listens or runs from this data dir any more.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
