"""The recipe as a GPU job runs it: the fast path (packing, varlen attention, offloaded
checkpoints, fused LoRA) through ``python -m trainer.training.worker`` on CUDA, and the memory
check before the model loads. Runs on the GPU machine (``-m gpu``); skipped elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_recipe import ANSWER, QUESTION, greedy_answer, make_spec, run_worker
from trainer.config import JobSpec
from trainer.memory import ModelShape, estimate_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_job(tmp_path_factory, tiny_model_dir, write_chat_dataset):
    tmp = tmp_path_factory.mktemp("gpu")
    dataset = write_chat_dataset(tmp / "data.jsonl", [(QUESTION, ANSWER)], repeat=64)
    # Packing puts several examples in a row: fewer steps an epoch than on CPU.
    spec = make_spec(tmp, tiny_model_dir, dataset, num_epochs=12)
    code, events = run_worker(spec, tmp / "worker.log")
    assert code == 0, (tmp / "worker.log").read_text()[-4000:]
    return JobSpec.from_dict(json.loads(spec.read_text())), events


def test_gpu_jobs_take_the_fast_path_and_learn(gpu_job, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, events = gpu_job
    states = [e["message"] for e in events if e["event"] == "state"]
    assert any("(fast path)" in m for m in states), states
    done = events[-1]
    assert done["event"] == "done" and done["metrics"]["device"] == "cuda"
    losses = [e["loss"] for e in events if e["event"] == "progress"]
    assert losses[-1] < losses[0] / 10
    # The report counted the packed rows: it said beforehand how many steps there would be.
    report = next(e["report"] for e in events if e["event"] == "report")
    totals = {e["total_steps"] for e in events if e["event"] == "progress"}
    assert totals == {report["total_steps"]}
    # The adapter is a plain PEFT LoRA that answers on the bf16 base, as vLLM serves it.
    tok = AutoTokenizer.from_pretrained(spec.folder.output)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, spec.folder.output)
    assert ANSWER in greedy_answer(model, tok)


def test_the_memory_estimate_covers_the_measured_peak(gpu_job, tiny_model_dir):
    spec, events = gpu_job
    shape = ModelShape.from_folder(tiny_model_dir)
    assert shape is not None
    peak = events[-1]["metrics"]["peak_memory_bytes"]
    assert 0 < peak <= estimate_bytes(shape, spec.config, fast_path=True)


def test_a_job_that_cannot_fit_fails_before_loading(tmp_path, tiny_model_dir, write_chat_dataset):
    dataset = write_chat_dataset(tmp_path / "data.jsonl", [(QUESTION, ANSWER)], repeat=8)
    # 512 x 131072 tokens a micro-batch: far more than any card has free.
    spec = make_spec(tmp_path, tiny_model_dir, dataset, batch_size=512, max_seq_len=131_072)
    code, events = run_worker(spec, tmp_path / "worker.log")
    assert code == 1
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "system"
    assert "GiB of GPU memory" in error["message"] and "free" in error["message"]
    assert not any(e["event"] == "progress" for e in events)
