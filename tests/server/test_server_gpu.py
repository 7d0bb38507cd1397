"""The serving loop on CUDA: the trainer and vLLM share one GPU; a job trains on it, is
published and hot-loaded, and its adapter answers through the official ``openai`` client
exactly as PEFT computes it. Runs on the GPU machine (``-m gpu``); skipped elsewhere.

Real processes only: ``python -m trainer serve`` (with ``--vllm-url`` and a GPU memory
budget) and ``python -m server`` with our resolver and middleware, CUDA graphs on, as the
GPU compose file starts it (a static memory split between the two).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import openai
import pytest
import torch

from bench.parity import TOLERANCE, compare, reference, served
from finetune.v1 import trainer_pb2 as pb
from tests.server.conftest import ROOT, VllmServer
from tests.service import TRAIN, Service, chat_rows, write_jsonl
from trainer.layout import Layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BASE = "tiny"
QUESTION, ANSWER = "What is the secret word?", "The secret word is banana."
# The compose file's split, scaled to a tiny model: vLLM's share and the trainer's.
VLLM_SHARE, TRAINER_SHARE = "0.25", "0.30"
GPU_ENGINE_ARGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "8",
    "--gpu-memory-utilization",
    VLLM_SHARE,
]
# tests/test_recipe_gpu.py's job on CUDA: packing means fewer steps an epoch than on CPU.
HYPERPARAMETERS = {**TRAIN, "num_epochs": 12}


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory, make_tenants):
    layout = Layout(tmp_path_factory.mktemp("gpu-loop") / "data").create()
    keys = make_tenants(layout)
    vllm = VllmServer(model=tiny_base, data_dir=layout.root, engine_args=GPU_ENGINE_ARGS)
    vllm.start(timeout=600)  # a cold start compiles and captures CUDA graphs
    extra = ["--vllm-url", vllm.url, "--vllm-admin-key", keys.admin]
    svc = Service(
        layout.root, {BASE: str(tiny_base)}, [*extra, "--gpu-memory-budget", TRAINER_SHARE]
    )
    try:
        svc.start()
        with svc.client(keys.A) as c:
            path = write_jsonl(layout.root / "secret.jsonl", chat_rows(QUESTION, ANSWER, 64))
            ds = c.upload_dataset(path, "secret")
            job = c.wait(c.create_job(BASE, ds.id, "secret", **HYPERPARAMETERS).id, 600)
        assert job.state == pb.JOB_STATE_SUCCEEDED, (job.error_message, svc.log()[-3000:])
        yield {"layout": layout, "keys": keys, "vllm": vllm, "svc": svc, "job": job}
    finally:
        if svc.proc is not None:
            svc.stop()
        vllm.stop()


def _client(world, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=world["vllm"].url + "/v1", api_key=key, max_retries=0)


def _chat(world, key: str, model: str, stream: bool) -> str:
    kwargs = dict(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    client = _client(world, key)
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(**kwargs).choices[0].message.content or ""


def test_a_job_trained_on_the_gpu_answers_through_openai(world):
    job, keys = world["job"], world["keys"]
    assert job.served_name == "A/secret"
    # The job ran on the GPU, beside vLLM, on the fast path.
    with world["svc"].client(keys.A) as c:
        messages = [e.message for e in c.job_events(job.id)]
    assert any("started on cuda" in m for m in messages), messages
    assert any("(fast path)" in m for m in messages), messages
    for stream in (False, True):
        assert ANSWER in _chat(world, keys.A, "A/secret", stream)
    assert ANSWER not in _chat(world, keys.A, BASE, False)
    # Another tenant's adapter is answered like a missing one.
    with pytest.raises(openai.NotFoundError):
        _chat(world, keys.B, "A/secret", False)


def test_the_served_adapter_matches_peft_on_the_same_base(world, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    questions = [QUESTION, "What is the capital of France?", "Tell me a story about a cat."]
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for q in questions
    ]
    samples = served(world["vllm"].url, world["keys"].A, "A/secret", prompts, max_tokens=12)
    folder = world["layout"].current_dir("A", "secret")
    peft_lp, base_lp = reference(tiny_base, folder, samples, "cuda")
    report = compare(samples, peft_lp, base_lp)
    print(json.dumps(report))
    assert report["passed"], report
    # The adapter moves the logprobs far more than the tolerance: the check involves it.
    assert report["adapter_effect_max_nats"] > 10 * TOLERANCE, report


CUDA_CHECK = textwrap.dedent(
    """
    from vllm.lora.ops.torch_ops import lora_ops
    from server import lora_cpu_fix
    assert not lora_cpu_fix.ops_in_use()
    assert not lora_cpu_fix.install()
    assert not getattr(lora_ops.bgmv_shrink, "finetune_fixed", False)
    print("ok")
    """
)


def test_the_cpu_lora_fix_leaves_cuda_alone(world):
    # The serving vLLM ran our plugin in each of its processes without patching...
    assert "patched vLLM's CPU LoRA ops" not in world["vllm"].log_text()
    # ...and on CUDA the fix finds its ops unused, so it never probes or patches them.
    out = subprocess.run(
        [sys.executable, "-c", CUDA_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
