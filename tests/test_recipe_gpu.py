"""The recipe as a GPU job runs it: the fast path (packing, varlen attention, offloaded
checkpoints, fused LoRA) through ``python -m trainer.training.worker`` on CUDA, and the memory
check before the model loads. Runs on the GPU machine (``-m gpu``); skipped elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.service import TRAIN
from tests.test_recipe import ANSWER, QUESTION, greedy_answer, make_spec, run_worker
from trainer.config import JobConfig, JobSpec
from trainer.memory import ModelShape, estimate_bytes, kept_layers_for_budget

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
    assert any("(fast path, " in m for m in states), states
    done = events[-1]
    assert done["event"] == "done" and done["metrics"]["device"] == "cuda"
    # No budget given: the tiny model's activations fit the free memory, so no layer is
    # checkpointed.
    shape = ModelShape.from_folder(tiny_model_dir)
    assert shape is not None and done["metrics"]["kept_layers"] == shape.layers
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
    metrics = events[-1]["metrics"]
    peak, kept = metrics["peak_memory_bytes"], metrics["kept_layers"]
    assert 0 < peak <= estimate_bytes(shape, spec.config, fast_path=True, kept_layers=kept)


def test_a_budget_decides_the_kept_layers_and_holds(tmp_path, tiny_model_dir, write_chat_dataset):
    """A budget between the all-checkpointed estimate and the all-kept one: the job keeps
    as many layers as it holds, and its measured peak stays under it."""
    shape = ModelShape.from_folder(tiny_model_dir)
    assert shape is not None
    overrides = dict(max_seq_len=512, batch_size=8)  # activations that matter on the tiny model
    cfg = JobConfig(**{**TRAIN, **overrides})  # the job make_spec writes
    budget = (estimate_bytes(shape, cfg) + estimate_bytes(shape, cfg, kept_layers=2)) // 2
    want = kept_layers_for_budget(shape, cfg, budget)
    assert 0 < want < shape.layers
    dataset = write_chat_dataset(tmp_path / "data.jsonl", [(QUESTION, ANSWER)], repeat=16)
    spec = make_spec(
        tmp_path, tiny_model_dir, dataset, {"memory_budget_bytes": budget}, num_epochs=1,
        **overrides,
    )  # fmt: skip
    code, events = run_worker(spec, tmp_path / "worker.log")
    assert code == 0, (tmp_path / "worker.log").read_text()[-4000:]
    metrics = events[-1]["metrics"]
    assert metrics["kept_layers"] == want
    assert 0 < metrics["peak_memory_bytes"] <= budget


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
