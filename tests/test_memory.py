"""The GPU memory budget: estimates track measured peaks; jobs that cannot fit are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.config import JobConfig
from trainer.errors import FailedPrecondition
from trainer.memory import (
    GIB,
    MemoryBudget,
    ModelShape,
    check_budget,
    estimate_bytes,
    gpu_memory,
    gpu_total_bytes,
    kept_layer_bytes,
    kept_layers_for_budget,
    plan_kept_layers,
)

# Llama 3.1 8B's config.json (the fields that decide memory).
LLAMA_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


@pytest.fixture
def llama_8b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


def test_estimates_track_the_peaks_measured_on_the_h200():
    # bench/README.md, runs 12 and 24: r=64, batch 4 x 2048, all seven projections.
    shape = ModelShape.from_config(LLAMA_8B)
    fast = estimate_bytes(shape, JobConfig()) / GIB
    reference = estimate_bytes(shape, JobConfig(), fast_path=False) / GIB
    assert 7.26 <= fast <= 7.26 * 1.03  # never under the measured peak
    assert reference == pytest.approx(15.78, rel=0.05)


# Run 46 (one H100, bench/results/h100-run46-*-results.jsonl), the present code: shape,
# budget GiB, the layers its plan kept, the peak allocated GiB.
RUN_46_PEAKS = [
    ("llama-3.1-8b", 8, 1, 7.26),
    ("llama-3.1-8b", 40, 31, 38.89),
    ("mistral-7b", 8, 2, 7.07),
    ("mistral-7b", 40, 32, 39.12),
    ("qwen2.5-7b", 8, 1, 7.24),
    ("qwen2.5-7b", 40, 27, 38.42),
]


@pytest.mark.parametrize("name,budget,kept,peak", RUN_46_PEAKS)
def test_each_budgets_plan_and_estimate_hold_the_peak_measured_on_the_gpu(
    name, budget, kept, peak
):
    """The plan a budget gives is the one measured, its estimate is never under the
    measured peak and fits the budget, and it is less than a kept layer above the peak
    (more would cost a layer the budget holds)."""
    from bench.train_speed import SHAPES

    arch, dims = SHAPES[name]
    shape = ModelShape.from_config({**LLAMA_8B, **dims, "model_type": arch})
    cfg = JobConfig()
    assert kept_layers_for_budget(shape, cfg, budget * GIB) == kept
    estimate = estimate_bytes(shape, cfg, kept_layers=kept) / GIB
    assert peak <= estimate <= budget
    assert estimate - peak < kept_layer_bytes(shape, cfg) / GIB


def test_the_estimate_grows_with_what_the_job_asks_for():
    shape = ModelShape.from_config(LLAMA_8B)
    base = estimate_bytes(shape, JobConfig())
    assert estimate_bytes(shape, JobConfig(batch_size=8)) > base
    assert estimate_bytes(shape, JobConfig(max_seq_len=4096)) > base
    assert estimate_bytes(shape, JobConfig(lora_rank=128)) > base
    assert estimate_bytes(shape, JobConfig(target_modules=("q", "v"))) < base


def test_a_budget_buys_kept_layers_and_the_estimate_follows_the_plan():
    """The fast path keeps as many layers' activations as the budget holds (about 1.07 GiB
    a layer at 8B x 8192 tokens; at 8 GiB the one that fits in the recompute's working set,
    which the backward has freed the kept layers' activations before it needs), and the
    estimate of that plan stays inside the budget."""
    shape = ModelShape.from_config(LLAMA_8B)
    cfg = JobConfig()
    base = estimate_bytes(shape, cfg)
    assert 1.0 * GIB < kept_layer_bytes(shape, cfg) < 1.2 * GIB
    # Its LoRA node draws the dropout again in the backward: dropout stores nothing more.
    assert kept_layer_bytes(shape, JobConfig(lora_dropout=0.0)) == kept_layer_bytes(shape, cfg)
    assert kept_layers_for_budget(shape, cfg, 6 * GIB) == 0
    assert kept_layers_for_budget(shape, cfg, 8 * GIB) == 1
    assert estimate_bytes(shape, cfg, kept_layers=1) == base
    assert estimate_bytes(shape, cfg, kept_layers=2) > base
    layers = shape.layers
    top = estimate_bytes(shape, cfg, kept_layers=layers)
    assert top - estimate_bytes(shape, cfg, kept_layers=layers - 1) == kept_layer_bytes(shape, cfg)
    # Kept activations and the working set are not held together: less than their sum.
    assert top < base + layers * kept_layer_bytes(shape, cfg)
    assert kept_layers_for_budget(shape, cfg, 1000 * GIB) == shape.layers
    for budget in (16, 24, 40):
        kept = kept_layers_for_budget(shape, cfg, budget * GIB)
        assert 0 < kept < shape.layers
        assert estimate_bytes(shape, cfg, kept_layers=kept) <= budget * GIB
        assert estimate_bytes(shape, cfg, kept_layers=kept + 1) > budget * GIB
    assert estimate_bytes(shape, cfg, kept_layers=0) == base
    # Biased q/k/v (Qwen 2's) take the same LoRA node: no dropped copies, no masks.
    qwen = ModelShape.from_config({**LLAMA_8B, "model_type": "qwen2"})
    assert kept_layer_bytes(qwen, cfg) == kept_layer_bytes(shape, cfg)
    assert estimate_bytes(shape, cfg, fast_path=False, kept_layers=8) == estimate_bytes(
        shape, cfg, fast_path=False
    )


def test_a_jobs_plan_holds_in_its_budget_and_in_the_free_memory():
    shape = ModelShape.from_config(LLAMA_8B)
    cfg = JobConfig()

    def plan(budget_gib: float, free_gib: float) -> int:
        return plan_kept_layers(
            shape, cfg, budget_bytes=int(budget_gib * GIB), free_bytes=int(free_gib * GIB)
        )

    # The budget decides where the card has more free; the free memory, less its margin
    # (1 GiB, or 5% of a large card), where it has less; no budget: the free memory alone.
    assert plan(40, 140) == kept_layers_for_budget(shape, cfg, 40 * GIB)
    assert plan(40, 20) == kept_layers_for_budget(shape, cfg, 19 * GIB) < plan(40, 140)
    assert plan(0, 140) == shape.layers
    assert plan(0, 40) == kept_layers_for_budget(shape, cfg, 38 * GIB)
    assert plan(8, 140) == plan(0, 9) == 1  # the one layer the working set holds


def test_a_job_over_the_budget_is_refused_with_what_to_change(llama_8b_dir):
    budget = MemoryBudget(fraction=0.40, total_bytes=16 * GIB)  # 6.4 GiB of a 16 GiB card
    with pytest.raises(FailedPrecondition) as e:
        budget.check(str(llama_8b_dir), JobConfig())
    message = str(e.value)
    assert "7.5 GiB" in message and "6.4 GiB" in message
    assert "FINETUNE_GPU_MEMORY_BUDGET" in message and "batch_size" in message
    # The same job fits when the trainer has more of the card, or asks for less.
    smaller = JobConfig(batch_size=1, max_seq_len=1024, lora_rank=16)
    assert budget.check(str(llama_8b_dir), smaller) is not None
    assert MemoryBudget(0.5, 16 * GIB).check(str(llama_8b_dir), JobConfig()) is not None


def test_nothing_is_checked_without_a_shape_or_a_gpu(tmp_path):
    assert ModelShape.from_folder(tmp_path / "missing") is None
    assert MemoryBudget(0.01, GIB).check("meta-llama/Llama-3.1-8B", JobConfig()) is None
    shape = ModelShape.from_config(LLAMA_8B)
    assert check_budget(shape, JobConfig(), None, None) == estimate_bytes(shape, JobConfig())


def test_the_tiny_test_model_has_a_shape(tiny_model_dir):
    shape = ModelShape.from_folder(tiny_model_dir)
    assert shape is not None and shape.head_dim == 64
    assert 0 < estimate_bytes(shape, JobConfig(lora_rank=8)) < GIB


def _nvidia_smi(query: str) -> list[list[str]]:
    """``nvidia-smi --query-gpu=QUERY`` rows, split on commas (MiB, no units)."""
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [[x.strip() for x in line.split(",")] for line in out.strip().splitlines()]


HAS_DRIVER = shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_without_a_gpu_there_is_no_memory_to_read_and_no_budget():
    """No NVIDIA driver here: NVML does not start, so no GPU, no total and no budget check
    (jobs are admitted as on a CPU host)."""
    assert gpu_memory() == {}
    assert gpu_total_bytes() is None
    assert MemoryBudget.detect(0.40) is None
    assert MemoryBudget.detect(None) is None


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")
def test_gpu_memory_read_through_nvml_is_what_nvidia_smi_reports():
    """Total and used memory of every GPU, by nvidia-smi's index, as nvidia-smi reports them
    (it rounds to MiB; used may move between the two reads by another process's work)."""
    rows = _nvidia_smi("index,memory.total,memory.used")
    gpus = gpu_memory()
    assert sorted(gpus) == [int(r[0]) for r in rows]
    for index, total_mib, used_mib in rows:
        gpu = gpus[int(index)]
        assert abs(gpu.total - (int(total_mib) << 20)) < 1 << 20, (index, gpu, total_mib)
        assert abs(gpu.used - (int(used_mib) << 20)) < 64 << 20, (index, gpu, used_mib)
    assert gpu_total_bytes() == gpus[0].total
    budget = MemoryBudget.detect(0.40)
    assert budget is not None and budget.total_bytes == gpus[0].total
