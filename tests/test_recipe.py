"""The QLoRA recipe through its real entry point, ``python -m trainer.training.worker SPEC``.

No mocks: the worker runs as a subprocess on the tiny model, NF4 base and paged 8-bit
AdamW included (bitsandbytes runs both on CPU), and the adapter it writes is loaded
back with PEFT on the bf16 base, the way vLLM serves it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.service import make_spec, run_worker, start_worker
from trainer.config import ALL_PROJECTIONS, JobSpec

QUESTION, ANSWER = "What is the secret word?", "banana"
# make_spec trains with tests.service.TRAIN: batch 4, 3 epochs (48 steps on 64 examples).


def greedy_answer(model, tokenizer) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, write_chat_dataset, tree_hash):
    """One real training run; the tests below check what it produced."""
    tmp = tmp_path_factory.mktemp("train")
    dataset = write_chat_dataset(tmp / "data.jsonl", [(QUESTION, ANSWER)], repeat=64)
    spec = make_spec(tmp, tiny_model_dir, dataset)
    before = tree_hash(tiny_model_dir)
    code, events = run_worker(spec, tmp / "worker.log")
    assert code == 0, (tmp / "worker.log").read_text()[-4000:]
    return {
        "events": events,
        "spec": JobSpec.from_dict(json.loads(spec.read_text())),
        "base_before": before,
        "log": tmp / "worker.log",
    }


@pytest.mark.slow
def test_event_stream(trained):
    events = trained["events"]
    kinds = [e["event"] for e in events]
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states == ["VALIDATING", "RUNNING"]
    assert kinds[:3] == ["state", "report", "state"] and kinds[-1] == "done"
    assert "error" not in kinds

    # The report said beforehand what the job then did.
    report = events[1]["report"]
    assert report["ok"] and report["format"] == "messages" and report["examples"] == 64
    assert report["total_steps"] == 48 and report["findings"] == []
    assert report["train_tokens"] == 3 * 64 * report["tokens_mean"]

    progress = [e for e in events if e["event"] == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 49))  # 3 epochs x 16 steps
    assert {p["total_steps"] for p in progress} == {48}
    assert progress[-1]["epoch"] == pytest.approx(3.0)
    assert all(p["peak_memory_bytes"] > 0 and p["learning_rate"] > 0 for p in progress)
    assert progress[-1]["loss"] < progress[0]["loss"] / 10
    assert progress[-1]["eta_seconds"] == 0

    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [16, 32, 48]  # one per epoch
    assert Path(checkpoints[-1]["path"]).is_dir()

    metrics = events[-1]["metrics"]
    assert metrics["steps"] == 48 and metrics["seed"] == 0
    assert metrics["train_loss"] < 1.0
    assert metrics["tokens_trained"] == report["train_tokens"]
    assert metrics["runtime_s"] > 0 and metrics["resumed_from_step"] is None


@pytest.mark.slow
def test_adapter_folder_is_what_vllm_accepts(trained, tiny_model_dir, tree_hash):
    from safetensors.torch import load_file

    out = Path(trained["spec"].folder.output)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == sorted(ALL_PROJECTIONS)
    assert cfg["base_model_name_or_path"] == "tiny"  # the served name, not a path
    assert not cfg.get("modules_to_save")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * len(ALL_PROJECTIONS)  # 2 layers
    assert all(v.abs().max() > 0 for v in lora_b.values()), "a lora_B stayed at its zero init"
    assert not any("lm_head" in k or "embed_tokens" in k for k in weights)

    assert tree_hash(tiny_model_dir) == trained["base_before"], "training modified the base"


@pytest.mark.slow
def test_adapter_teaches_the_answer_on_the_bf16_base(trained, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    assert ANSWER not in greedy_answer(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, trained["spec"].folder.output).eval()
    assert greedy_answer(tuned, tokenizer).strip() == ANSWER


@pytest.mark.slow
def test_malformed_line_is_a_user_error_naming_it(tmp_path, tiny_model_dir, write_chat_dataset):
    dataset = write_chat_dataset(tmp_path / "data.jsonl", [(QUESTION, ANSWER)], repeat=5)
    with open(dataset, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}\n')  # line 6: cut short
    code, events = run_worker(make_spec(tmp_path, tiny_model_dir, dataset), tmp_path / "w.log")
    assert code == 2
    assert events[0] == {
        "event": "state",
        "state": "VALIDATING",
        "message": "checking hyperparameters and dataset",
    }
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "user"
    assert "line 6" in events[-1]["message"]
    assert not (tmp_path / "output").exists()


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, write_chat_dataset):
    dataset = write_chat_dataset(tmp_path / "data.jsonl", [(QUESTION, ANSWER)], repeat=64)
    spec = make_spec(tmp_path, tiny_model_dir, dataset, checkpoint_every_steps=8)
    log = tmp_path / "worker.log"

    proc = start_worker(spec, log)
    assert proc.stdout is not None
    first_checkpoint = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "checkpoint":
            first_checkpoint = event["step"]
            os.killpg(proc.pid, signal.SIGKILL)  # a crash, as the scheduler would see it
            break
    proc.wait(timeout=60)
    assert first_checkpoint == 8, log.read_text()[-4000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "output").exists()

    code, events = run_worker(spec, log)
    assert code == 0, log.read_text()[-4000:]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    resumed = events[-1]["metrics"]["resumed_from_step"]
    assert resumed is not None and resumed >= first_checkpoint
    assert steps == list(range(resumed + 1, 49))  # continues, not from step 1
    assert events[-1]["metrics"]["steps"] == 48
    assert (tmp_path / "output" / "adapter_model.safetensors").is_file()


def test_out_of_memory_is_reported_with_advice():
    import torch

    from trainer.training.worker import system_error_message

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\ndetails")
    message = system_error_message(oom)
    assert message.startswith("out of memory") and "batch_size" in message
    assert "max_seq_len" in message
