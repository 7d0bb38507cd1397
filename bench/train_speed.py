"""QLoRA training speed and memory on one GPU: reference recipe vs Unsloth vs our fast path.

Runs on the GPU machine in one call. An 8B-shaped Llama (Llama 3.1 8B dimensions, random
weights) is built once and saved in bf16 safetensors, then every recipe loads it the
product's way (``from_pretrained`` with NF4, double quantisation, bf16 compute) in its
own subprocess (Unsloth patches transformers globally). Each recipe trains LoRA r=64,
alpha 128 on all seven projections with paged 8-bit AdamW, batch 4 x accumulation 4, on

* ``full``: rows of 2048 tokens;
* ``mix``: example lengths log-normal (median 300, sigma 0.9) clipped to [16, 2048];
  4 examples a step for the reference and Unsloth (padded and padding-free), packed
  into rows of up to 2048 tokens for the fast path (TRL's BFD packing).

It prints real (non-padding) tokens/s, the share of the bf16 matmul peak measured in
the same run (46.6 GFLOP per token with checkpointing), peak allocated and reserved GiB
and the ratios. Results are JSON lines in ``$OUT/results.jsonl``.

    python3 bench/train_speed.py                       # everything
    python3 bench/train_speed.py --recipes fast --variants fast,fast-nooffload
    python3 bench/train_speed.py --shape qwen2.5-7b --recipes fast,unsloth,unsloth-nogc
    python3 bench/train_speed.py --recipes fast --budget-gib 40   # the plan a budget buys

``--shape`` picks the model's dimensions (``SHAPES``: Llama 3.1 8B, the default, Mistral 7B,
Qwen 2.5 7B; random weights each). ``unsloth-nogc`` is Unsloth without its gradient
checkpointing, what a user with a large card runs. ``--budget-gib`` gives the product a job
memory budget: the fast path keeps as many decoder layers' activations (no checkpoint, no
recompute) as ``trainer.memory.kept_layers_for_budget`` says the budget holds.

bench/README.md has the device call (wheels from ``bench/slim_wheels.py``) and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GFLOP_PER_TOKEN = 46.6  # forward + recompute + input-gradient backward, 8B, with checkpointing
# Model shapes by ``--shape``: transformers' architecture and config.json's dimensions.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("llama", {}),  # bench.tokenwords.LLAMA_8B, the serving bench's shape
    "mistral-7b": (
        "mistral",
        dict(
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=1e6,
            sliding_window=None,
        ),
    ),
    "qwen2.5-7b": (  # q/k/v carry biases: the one-node LoRA layer adds them in its first GEMM
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
    ),
}


def gflop_per_token(config: dict) -> float:
    """``GFLOP_PER_TOKEN`` scaled to another shape by its projections' and LM head's weights
    (the GEMMs that dominate; attention's share is about the same at 2048 tokens)."""

    def weights(c: dict) -> float:
        h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        q = c["num_attention_heads"] * c.get("head_dim", h // c["num_attention_heads"])
        kv = c["num_key_value_heads"] * c.get("head_dim", h // c["num_attention_heads"])
        return n * (2 * h * q + 2 * h * kv + 3 * h * i) + c["vocab_size"] * h

    from bench.tokenwords import LLAMA_8B

    return GFLOP_PER_TOKEN * weights(config) / weights(LLAMA_8B)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, ACCUM = 2048, 4, 4
DEVICE_MAP: dict | str = {"": 0}  # the CPU smoke test of this script sets "cpu"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def log(*parts: object) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------ model and peak


def build(model_dir: Path, out: Path, shape: str = "llama-3.1-8b") -> None:
    """Write the random model of ``shape`` and a stand-in tokenizer; measure the bf16 peak."""
    import torch

    if not (model_dir / "config.json").exists():
        import transformers
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        from bench.tokenwords import LLAMA_8B  # the shape the serving bench uses too

        t0 = time.time()
        arch, dims = SHAPES[shape]
        name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch]
        config_cls = getattr(transformers, f"{name}Config")
        model_cls = getattr(transformers, f"{name}ForCausalLM")
        config = config_cls(
            **{"rms_norm_eps": 1e-5, **(dims or LLAMA_8B)},
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dtype="bfloat16",
        )
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = model_cls(config)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(model_dir, max_shard_size="5GB")
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            model_max_length=SEQ,
        )
        tok.save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
        log(f"built {model_dir} in {time.time() - t0:.0f}s")

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    peak = 2 * n**3 / times[len(times) // 2] / 1e12
    line = {"kind": "peak", "bf16_tflops": round(peak, 1), "gpu": torch.cuda.get_device_name()}
    log("RESULT " + json.dumps(line))


# ------------------------------------------------------------------ data


MIX_EXAMPLES = 1200
DATA_SEED = 0  # the examples' lengths and tokens; the summary re-draws the lengths


def example_lengths(workload: str, n: int, rng):
    import numpy as np

    if workload == "full":
        return np.full(n, SEQ)
    return np.clip(rng.lognormal(np.log(300), 0.9, n), 16, SEQ).astype(int)


def make_dataset(workload: str, n: int, seed: int = DATA_SEED, vocab: int = 128256):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    lengths = example_lengths(workload, n, rng)
    rows = [rng.integers(4, min(vocab, 128000), int(k)).tolist() for k in lengths]
    return Dataset.from_dict({"input_ids": rows})


# ------------------------------------------------------------------ measuring


class HostProfile:
    """One step under cProfile, with every host-device synchronisation counted by caller.

    Where the CPU is behind the GPU (``idle_report``'s late launches), this says which
    Python code spends the host's time, and which lines make the host wait for the GPU.
    """

    def __enter__(self):
        import cProfile
        import warnings

        import torch

        self.warnings = warnings.catch_warnings(record=True)
        self.caught = self.warnings.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.prof = cProfile.Profile()
        self.prof.enable()
        return self

    def __exit__(self, *exc):
        import torch

        self.prof.disable()
        torch.cuda.set_sync_debug_mode("default")
        self.warnings.__exit__(*exc)

    def report(self, wall: float) -> str:
        import io
        import pstats
        from collections import Counter

        syncs = Counter(
            f"{w.filename}:{w.lineno}" for w in self.caught if "synchroniz" in str(w.message)
        )
        text = [f"one optimizer step under cProfile: wall {wall:.3f}s"]
        text.append(f"host-device synchronisations: {sum(syncs.values())}, by caller:")
        text += [f"  {n:5d}  {where}" for where, n in syncs.most_common(30)]
        for sort in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(self.prof, stream=buf).sort_stats(sort).print_stats(60)
            text.append(buf.getvalue())
        return "\n".join(text)


class Meter:
    """Counts real tokens per forward and times optimizer steps (synchronised)."""

    def __init__(
        self, model, warmup: int, measure: int, profile_to: Path | None, host: bool = False
    ) -> None:
        import torch
        from transformers import TrainerCallback

        self.pending: list = []
        self.step_tokens: list[int] = []
        self.step_ends: list[float] = []
        self.warmup, self.measure, self.profile_to = warmup, measure, profile_to
        self.host = host  # the profile is HostProfile's (cProfile), not PyTorch's
        self.prof = None
        meter = self

        def count(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            if mask is not None:
                meter.pending.append(mask.sum())
            elif ids is not None:
                meter.pending.append(torch.tensor(ids.numel()))

        self.hook = model.register_forward_pre_hook(count, with_kwargs=True)

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.step_ends.append(time.perf_counter())
                meter.pending.clear()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.step_ends.append(time.perf_counter())
                meter.step_tokens.append(int(sum(int(t) for t in meter.pending)))
                meter.pending.clear()
                done = len(meter.step_tokens)
                if meter.profile_to is not None and done == meter.warmup + meter.measure:
                    if meter.host:
                        meter.prof = HostProfile()
                    else:
                        meter.prof = torch.profiler.profile(
                            activities=[
                                torch.profiler.ProfilerActivity.CPU,
                                torch.profiler.ProfilerActivity.CUDA,
                            ]
                        )
                    meter.prof.__enter__()
                elif meter.prof is not None:
                    meter.prof.__exit__(None, None, None)
                    meter.write_profile(meter.step_ends[-1] - meter.step_ends[-2])
                    meter.prof = None

        self.callback = Callback()

    def write_profile(self, wall: float) -> None:
        assert self.profile_to is not None
        if self.host:
            self.profile_to.write_text(self.prof.report(wall))
            return
        ka = self.prof.key_averages()
        attr = "self_device_time_total"
        busy = sum(getattr(e, attr, 0) for e in ka) / 1e6
        text = [f"one optimizer step: wall {wall:.3f}s, summed self device time {busy:.3f}s"]
        for sort in ("self_device_time_total", "self_cpu_time_total"):
            try:
                text.append(ka.table(sort_by=sort, row_limit=45, max_name_column_width=70))
            except Exception as e:  # profiler column names move between versions
                text.append(f"table by {sort} failed: {e}")
        trace = self.profile_to.with_suffix(".trace.json")
        try:
            self.prof.export_chrome_trace(str(trace))
            text.insert(1, idle_report(json.loads(trace.read_text())["traceEvents"]))
        except Exception as e:  # the report is a help, never the run's failure
            text.insert(1, f"idle report failed: {type(e).__name__}: {e}")
        finally:
            trace.unlink(missing_ok=True)
        self.profile_to.write_text("\n".join(text))

    def result(self) -> dict:
        w, m = self.warmup, self.measure
        ends, toks = self.step_ends, self.step_tokens
        m = min(m, len(toks) - w)
        window = ends[w + m] - ends[w]
        tokens = sum(toks[w : w + m])
        steps = sorted(ends[i + 1] - ends[i] for i in range(w, w + m))
        return {
            "tokens_per_s": round(tokens / window, 1),
            "measured_steps": m,
            "micro_steps": m * ACCUM,
            "tokens_measured": tokens,
            "step_s_median": round(steps[len(steps) // 2], 3),
            # Each measured step, in order: the spread says how far one run's figure moves.
            "step_s": [round(ends[i + 1] - ends[i], 3) for i in range(w, w + m)],
            # and its real tokens: unpacked recipes' steps hold what their examples hold.
            "step_tokens": toks[w : w + m],
            "first_step_s": round(ends[1] - ends[0], 2),
        }


def idle_report(events: list[dict], min_gap_us: float = 5.0, top: int = 30) -> str:
    """Where the busiest GPU stream waits, from a Kineto trace's events.

    Each gap before a kernel is "late" when the CPU launched that kernel only after the
    stream had gone idle (the host is the bottleneck there), else "queued" (the kernel
    was waiting on something else: an event, a copy, launch latency). Gaps are summed by
    the CPU ops that enclosed the late launch (innermost three levels).
    """
    import bisect
    from collections import defaultdict

    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    by_stream: dict = defaultdict(float)
    for k in kernels:
        by_stream[k["args"].get("stream")] += k["dur"]
    if not by_stream:
        return "idle report: no kernels in the trace"
    main = max(by_stream, key=by_stream.__getitem__)
    ks = sorted((k for k in kernels if k["args"].get("stream") == main), key=lambda k: k["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ops: dict = defaultdict(list)  # thread -> its CPU ops, by start
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            ops[e.get("tid")].append(e)
    starts = {}
    for tid, lst in ops.items():
        lst.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in lst]

    def enclosing(launch: dict) -> str:
        tid, t = launch.get("tid"), launch["ts"]
        lst = ops.get(tid, [])
        i = bisect.bisect_right(starts.get(tid, []), t)
        chain = []
        for e in reversed(lst[max(0, i - 4000) : i]):
            if e["ts"] + e["dur"] >= t:
                chain.append(e["name"][:40])
                if len(chain) == 3:
                    break
        return " < ".join(chain) or "(no CPU op)"

    late: dict = defaultdict(float)
    late_n: dict = defaultdict(int)
    queued = late_sum = 0.0
    end = ks[0]["ts"] + ks[0]["dur"]
    for k in ks[1:]:
        gap = k["ts"] - end
        if gap > min_gap_us:
            launch = launches.get(k["args"].get("correlation"))
            if launch is not None and launch["ts"] > end:
                key = enclosing(launch)
                late[key] += gap
                late_n[key] += 1
                late_sum += gap
            else:
                queued += gap
        end = max(end, k["ts"] + k["dur"])
    span = end - ks[0]["ts"]
    busy = by_stream[main]
    lines = [
        f"busiest stream {main}: span {span / 1e3:.1f} ms, kernels {busy / 1e3:.1f} ms "
        f"({busy / span:.1%}), idle {(span - busy) / 1e3:.1f} ms: launched late "
        f"{late_sum / 1e3:.1f} ms, queued {queued / 1e3:.1f} ms (gaps > {min_gap_us:g} us)",
        "late launches by enclosing CPU ops (ms, count):",
    ]
    for key in sorted(late, key=late.__getitem__, reverse=True)[:top]:
        lines.append(f"  {late[key] / 1e3:8.1f} {late_n[key]:6d}  {key}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ recipes


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def sft_args(out_dir: str, steps: int, **extra):
    from trl import SFTConfig

    args = dict(
        max_length=SEQ,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=3,
        learning_rate=2e-4,
        optim="paged_adamw_8bit",
        fp16=False,
        bf16=True,
        logging_steps=10,
        save_strategy="no",
        output_dir=out_dir,
        max_steps=steps,
        report_to="none",
        seed=42,
    )
    args.update(extra)
    return SFTConfig(**args)


def load_reference(model_dir: Path):
    """DEVELOPERS.md's recipe as written: prepare_model_for_kbit_training, dropout 0.05."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config(), device_map=DEVICE_MAP
    )
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=64,
        lora_alpha=128,
        target_modules=ALL_PROJECTIONS,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), AutoTokenizer.from_pretrained(model_dir)


def load_unsloth(model_dir: Path, checkpointing: str | bool = "unsloth"):
    """Unsloth as it recommends: its loader, dropout 0, its offloaded checkpointing; with
    ``checkpointing=False`` (the ``unsloth-nogc`` recipe) no checkpointing at all, what a
    user whose card holds every activation turns to."""
    import torch
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=64,
        lora_alpha=128,
        lora_dropout=0,
        target_modules=ALL_PROJECTIONS,
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=3407,
    )
    return model, tok


def kept_layers(model_dir: Path, budget_gib: float | None) -> int:
    """Decoder layers the product keeps (not checkpointed) within ``budget_gib``."""
    from trainer.config import JobConfig
    from trainer.memory import GIB, ModelShape, kept_layers_for_budget

    shape = ModelShape.from_folder(model_dir)
    if budget_gib is None or shape is None:
        return 0
    return kept_layers_for_budget(shape, JobConfig(), budget_gib * GIB)


def load_fast(model_dir: Path, budget_gib: float | None = None):
    """The product's recipe as a GPU job runs it: ``trainer.training.recipe.load_model`` with the
    fast path, at the reference hyperparameters (r=64, alpha 128, dropout 0.05); with a
    budget, the last layers the budget holds keep their activations."""
    from transformers import AutoTokenizer

    from trainer.config import JobConfig
    from trainer.fastpath import FastPathConfig
    from trainer.training.recipe import load_model

    fast = FastPathConfig(kept_layers=kept_layers(model_dir, budget_gib))
    model = load_model(str(model_dir), JobConfig(), fast)
    return model, AutoTokenizer.from_pretrained(model_dir)


def apply_variant(model, variant: str):
    """Switch the fast path's pieces on or off in place; return the ``FastPathConfig``
    (its SFTConfig extras and Trainer callbacks).

    ``fast`` is everything on; ``-nopack``, ``-nofuse``, ``-nooffload``, ``-nocompile``,
    ``-gpuembed``, ``-hostgather`` (host embeddings gathered on the host, not mapped),
    ``-addmm`` (the LoRA layer as PEFT modules + one ``addmm``, not one autograd node),
    ``-nolean`` (the recompute runs the down projection too), ``-noreplay`` (the
    recompute runs the attention and q/k/v again instead of replaying what the forward
    parked), ``-noresid`` (the recompute runs the output projection again instead of
    reading the parked residual stream), ``-nansync`` (the per-micro-step host reads:
    the NaN check, blocking batch copies, the GPU token count), ``-noflat`` (the
    optimizer steps each LoRA weight alone, not packed into one buffer), ``-loraafter``
    (the LoRA term added after the base GEMM in every layer, not written first where
    ``fastpath.lora_first`` says),
    ``-draw4`` (the dropout kernels draw 4 elements a Philox call, not 8) and
    ``-bnbdequant`` (NF4 weights dequantised by bitsandbytes' kernels, not
    ``kernels.dequantize_nf4``) and ``-nodense`` (rows of equal examples through varlen
    FlashAttention 2, not one dense cuDNN call) and
    ``-biasaddmm`` (biased projections, Qwen 2's q/k/v, as PEFT modules + one ``addmm``, not
    one autograd node) turn one piece off each; ``-rounds7`` runs
    Philox with 7 rounds, not 10; ``-drop0`` sets LoRA dropout to 0; ``-noparkdense`` turns
    off ``attention.DENSE_PARKED`` (an offloaded checkpoint's forward of equal examples
    through cuDNN, replayed from its log-sum-exp; varlen FlashAttention 2 instead);
    ``-nofusedrop`` writes the LoRA input's dropped copy out for cuBLAS to read instead of
    drawing the mask inside the small GEMMs that read it (``kernels.FUSED_DROPOUT_MM``);
    ``-packedcheck`` lets transformers read the positions on the host before each forward
    again (``masking.SKIP_PACKED_CHECK``).
    """
    import sys

    import torch
    import torch.nn.functional as F
    from peft.tuners.lora import LoraLayer

    from trainer import fastpath
    from trainer.fastpath import attention, checkpoint, elementwise, kernels, lora, masking

    flags = set(variant.split("-")[1:])
    kernels.DRAWS_PER_CALL = 4 if "draw4" in flags else 8
    kernels.PHILOX_ROUNDS = 7 if "rounds7" in flags else 10
    kernels.FUSED_NF4 = "bnbdequant" not in flags
    kernels.FUSED_DROPOUT_MM = "nofusedrop" not in flags
    masking.SKIP_PACKED_CHECK = "packedcheck" not in flags
    attention.DENSE_EQUAL = "nodense" not in flags
    attention.DENSE_PARKED = "noparkdense" not in flags
    base = model.get_base_model()
    pack = "nopack" not in flags
    base.set_attn_implementation(fastpath.ATTN_IMPLEMENTATION if pack else "sdpa")
    func = checkpoint.non_reentrant_checkpoint if "nooffload" in flags else None
    func = func or checkpoint.offloaded_checkpoint
    eager = "nocompile" in flags
    for module in base.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
        if hasattr(module, "_fastpath_eager_forward"):
            norm = type(module).__name__.endswith("RMSNorm")
            fused = elementwise.norm_forward if norm else elementwise.mlp_forward
            module.forward = module._fastpath_eager_forward if eager else fused.__get__(module)
        if isinstance(module, fastpath.HostEmbedding):
            if not hasattr(module, "_bench_mapped"):
                module._bench_mapped = module.mapped
            module.mapped = None if "hostgather" in flags else module._bench_mapped
            if "gpuembed" in flags:  # the table back on the GPU, as without host embeddings
                if not hasattr(module, "_bench_table"):
                    module._bench_table = module.table.to(module.device)
                table = module._bench_table
                module.forward = lambda ids, t=table, m=module: F.embedding(ids, t, m.padding_idx)
            else:
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_bench_table", None)
                torch.cuda.empty_cache()
    modeling = sys.modules[type(base).__module__]
    if hasattr(modeling, "_fastpath_eager_rope"):
        rope = modeling._fastpath_eager_rope if eager else modeling._fastpath_compiled_rope
        if hasattr(modeling, "_fastpath_rope"):  # behind the replay's RoPE function
            modeling._fastpath_rope = rope
        else:
            modeling.apply_rotary_pos_emb = rope
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "_fastpath_forward"):
            if "nofuse" in flags:
                module.forward = module._fastpath_forward
            else:
                module.forward = lora.fused_lora_forward.__get__(module)
            biased = getattr(module.get_base_layer(), "bias", None) is not None
            module._fastpath_autograd = "addmm" not in flags and not (
                biased and "biasaddmm" in flags
            )
            if not hasattr(module, "_bench_lora_first"):
                module._bench_lora_first = getattr(module, "_fastpath_lora_first", (False, False))
            after = "loraafter" in flags
            module._fastpath_lora_first = (False, False) if after else module._bench_lora_first
            if hasattr(module, "_fastpath_output_unused"):
                module._fastpath_output_unused = "nolean" not in flags
            if not hasattr(module, "_bench_dropout"):
                module._bench_dropout = module.lora_dropout["default"]
            drop = torch.nn.Identity() if "drop0" in flags else module._bench_dropout
            module.lora_dropout["default"] = drop
        if hasattr(module, "_fastpath_replay"):
            # What fuse_lora left (a norm parks nothing where o_proj has no LoRA), then
            # the variant's switch: an attention module has o_proj, a norm does not.
            if not hasattr(module, "_bench_replay"):
                module._bench_replay = module._fastpath_replay
            off = "noreplay" if hasattr(module, "o_proj") else "noresid"
            module._fastpath_replay = module._bench_replay and off not in flags
    return fastpath.FastPathConfig(
        varlen_attention=pack,
        sync_free_steps="nansync" not in flags,
        flat_optimizer="noflat" not in flags,
    )


def estimate_gib(model_dir: Path, recipe: str, kept: int = 0) -> float | None:
    """What the trainer's memory budget check expects this recipe (and plan) to need."""
    from trainer.config import JobConfig
    from trainer.memory import GIB, ModelShape, estimate_bytes

    shape = ModelShape.from_folder(model_dir)
    if shape is None or recipe.startswith("unsloth"):
        return None
    fast = recipe == "fast"
    return round(estimate_bytes(shape, JobConfig(), fast_path=fast, kept_layers=kept) / GIB, 2)


def warmup_steps(args, workload: str) -> int:
    """Optimizer steps before the measured ones; more on the mix (run 27). There Unsloth's
    first steps run slow (steps 1 and 3: 11.3 and 7.4 s), and steps 4-11 hold shorter
    examples than the dataset: 6,292 real tokens a step against its 6,653 mean, while
    Unsloth's steps take about 2 s whatever they hold. Steps 13-20 hold 6,833."""
    return args.warmup_mix if workload == "mix" else args.warmup


def worker(recipe: str, variants: list[str], workloads: list[str], args) -> None:
    import gc

    if recipe.startswith("unsloth"):
        import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    import torch
    from trl import SFTTrainer

    t0 = time.time()
    dims = json.loads((args.model_dir / "config.json").read_text())
    kept = kept_layers(args.model_dir, args.budget_gib) if recipe == "fast" else 0
    loaders = {
        "reference": load_reference,
        "unsloth": load_unsloth,
        "unsloth-nogc": lambda d: load_unsloth(d, checkpointing=False),
        "fast": lambda d: load_fast(d, args.budget_gib),
    }
    model, tok = loaders[recipe](args.model_dir)
    log(f"[{recipe}] loaded in {time.time() - t0:.0f}s")
    # +1: a spare step (profiled for the fast path)
    steps = {w: warmup_steps(args, w) + args.measure + 1 for w in ("full", "mix")}
    data = {
        "full": make_dataset("full", steps["full"] * ACCUM * BATCH, vocab=dims["vocab_size"]),
        "mix": make_dataset("mix", MIX_EXAMPLES, vocab=dims["vocab_size"]),
    }
    for spec in variants:
        # "fast-nofuse:full" runs that variant on the full workload only
        variant, _, only = spec.partition(":")
        fast = apply_variant(model, variant) if recipe == "fast" else None
        extra = fast.sft_args() if fast is not None else {}
        if recipe.startswith("unsloth"):
            extra = {"padding_free": True, "max_length": None}
        for workload in only.split("+") if only else workloads:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            prof = None
            if args.profile and variant in ("fast", "unsloth", "unsloth-nogc"):
                prof = args.out / f"profile_{variant}_{workload}.txt"
            if args.host_profile and variant in ("fast", "unsloth", "unsloth-nogc"):
                prof = args.out / f"python_{variant}_{workload}.txt"
            warmup = warmup_steps(args, workload)
            meter = Meter(model, warmup, args.measure, prof, host=args.host_profile)
            config = sft_args(str(args.scratch / f"{variant}-{workload}"), steps[workload], **extra)
            trainer = SFTTrainer(
                model=model,
                processing_class=tok,
                train_dataset=data[workload],
                args=config,
                callbacks=[meter.callback, *(fast.callbacks(model) if fast is not None else [])],
                optimizer_cls_and_kwargs=fast.optimizer(config) if fast is not None else None,
            )
            try:
                out = trainer.train()
                res = meter.result()
                res["train_loss"] = round(out.training_loss, 4)
                res["error"] = None
            except Exception as e:  # report and go on with the next workload
                import traceback

                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"[:500]}
            res.update(
                kind="train",
                recipe=recipe,
                variant=variant,
                workload=workload,
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                estimate_gib=estimate_gib(args.model_dir, recipe, kept),
                shape=args.shape,
                gflop_per_token=round(gflop_per_token(dims), 2),
                budget_gib=args.budget_gib if recipe == "fast" else None,
                kept_layers=kept if recipe == "fast" else None,
            )
            log("RESULT " + json.dumps(res))
            meter.hook.remove()
            del trainer
            gc.collect()


# ------------------------------------------------------------------ orchestration


def run_child(
    cmd: list[str], logf, timeout: float, extra_path: str = "", extra_env: dict | None = None
) -> list[dict]:
    path = ":".join(p for p in (str(ROOT), extra_path, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": path, **(extra_env or {})}
    results = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    deadline = time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        logf.write(line)
        logf.flush()
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
            log(line.rstrip())
        elif line.startswith("[") or "Error" in line or "error" in line[:80]:
            log("  " + line.rstrip()[:300])
        if time.time() > deadline:
            proc.kill()
            log(f"  killed after {timeout:.0f}s: {' '.join(cmd[-6:])}")
            break
    proc.wait()
    return results


def summarise(results: list[dict], out: Path) -> str:
    peak = next((r["bf16_tflops"] for r in results if r.get("kind") == "peak"), None)
    rows = [r for r in results if r.get("kind") == "train"]
    lines = [
        f"GPU: {next((r['gpu'] for r in results if r.get('kind') == 'peak'), '?')}, "
        f"measured bf16 matmul peak {peak} TFLOP/s"
    ]
    shapes = list(dict.fromkeys(r.get("shape") or "llama-3.1-8b" for r in rows))
    for shape, workload in ((s, w) for s in shapes for w in ("full", "mix")):
        sel = [
            r
            for r in rows
            if r["workload"] == workload and (r.get("shape") or "llama-3.1-8b") == shape
        ]
        if not sel:
            continue
        ref = next((r for r in sel if r["variant"] == "reference" and not r["error"]), None)
        uns = next((r for r in sel if r["variant"] == "unsloth" and not r["error"]), None)
        nogc = next((r for r in sel if r["variant"] == "unsloth-nogc" and not r["error"]), None)
        lines.append(
            f"\n{shape}, {workload}: real tokens/s | share of peak | peak alloc / "
            "reserved GiB | vs reference | vs Unsloth | vs Unsloth no-GC | median step s | "
            "real tokens a step | loss | budget estimate GiB"
        )
        if workload == "mix":
            import numpy as np

            mean = example_lengths("mix", MIX_EXAMPLES, np.random.default_rng(DATA_SEED)).mean()
            lines.append(
                f"  (the dataset: {mean * ACCUM * BATCH:,.0f} real tokens a step of "
                f"{ACCUM * BATCH} examples on average, what an unpacked recipe's step holds)"
            )
        for r in sel:
            if r["error"]:
                lines.append(f"  {r['variant']:<24} ERROR {r['error'][:160]}")
                continue
            tps = r["tokens_per_s"]
            flop = r.get("gflop_per_token", GFLOP_PER_TOKEN)
            share = tps * flop / 1e3 / peak if peak else float("nan")
            vs_ref = f"{tps / ref['tokens_per_s']:.2f}x" if ref else "-"
            vs_uns = f"{tps / uns['tokens_per_s']:.2f}x" if uns else "-"
            vs_nogc = f"{tps / nogc['tokens_per_s']:.2f}x" if nogc else "-"
            label = r["variant"]
            if r.get("budget_gib") is not None:
                over = " OVER" if r["peak_alloc_gib"] > r["budget_gib"] else ""
                label += f" @{r['budget_gib']:g}GiB k{r['kept_layers']}{over}"
            lines.append(
                f"  {label:<24} {tps:>9,.0f} | {share:6.1%} | "
                f"{r['peak_alloc_gib']:5.2f} / {r['peak_reserved_gib']:5.2f} | {vs_ref} | {vs_uns}"
                f" | {vs_nogc}"
                f" | {r['step_s_median']} | {r['tokens_measured'] / r['measured_steps']:,.0f}"
                f" | {r.get('train_loss')} | {r.get('estimate_gib')}"
            )
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--recipes", default="fast,reference,unsloth", help="also unsloth-nogc")
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="the product's job memory budget: it keeps the layers this holds",
    )
    p.add_argument("--variants", default="fast", help="fast-path variants, e.g. fast-nooffload")
    p.add_argument("--workloads", default="full,mix")
    # 3, not 1: Unsloth's first mix steps after one warm-up step still ran slow (3.0 and
    # 3.3 s against 1.9-2.5 s in run 16), which flattered the ratio.
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps (x4 micro-steps)")
    p.add_argument("--warmup-mix", type=int, default=12, help="the same, on the mix")
    p.add_argument("--measure", type=int, default=4, help="optimizer steps (x4 micro-steps)")
    p.add_argument("--profile", action="store_true", help="profile a step (fast, Unsloth)")
    p.add_argument(
        "--host-profile", action="store_true", help="cProfile a step, counting syncs by caller"
    )
    p.add_argument("--budget-s", type=float, default=540, help="stop starting recipes after this")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        shm = Path("/dev/shm")
        roomy = shm.exists() and shutil.disk_usage(shm).free > 24 * 2**30
        name = "llama-8b" if args.shape == "llama-3.1-8b" else args.shape
        args.model_dir = (shm if roomy else Path("/tmp")) / f"{name}-random"
    args.scratch = Path("/tmp/bench-scratch")
    workloads = args.workloads.split(",")

    if args.build:
        return build(args.model_dir, args.out, args.shape)
    if args.worker:
        variants = args.variants.split(",") if args.worker == "fast" else [args.worker]
        return worker(args.worker, variants, workloads, args)

    t0 = time.time()
    results: list[dict] = []
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--out", str(args.out), "--model-dir", str(args.model_dir)]
    common += ["--warmup", str(args.warmup), "--warmup-mix", str(args.warmup_mix)]
    common += ["--measure", str(args.measure), "--shape", args.shape]
    common += ["--budget-gib", str(args.budget_gib)] if args.budget_gib is not None else []
    common += ["--workloads", args.workloads] + (["--profile"] if args.profile else [])
    common += ["--host-profile"] if args.host_profile else []
    with open(args.out / "log.txt", "a") as logf:
        results += run_child([*me, "--build", *common], logf, 300)
        for recipe in args.recipes.split(","):
            left = args.budget_s - (time.time() - t0)
            # A recipe needs about 100 s (load, both workloads): one started with less is
            # killed half-way (run 7 lost its Unsloth figure so), so it is not started.
            if left < 150:
                log(f"skipping {recipe}: {left:.0f}s of the budget left, 150s needed")
                continue
            cmd = [*me, "--worker", recipe, "--variants", args.variants, *common]
            # Unsloth's wheels (and its torchao) are on the path of its own subprocess only.
            unsloth = recipe.startswith("unsloth")
            extra = os.environ.get("BENCH_UNSLOTH_PATH", "") if unsloth else ""
            # The product's allocator setting, as trainer.training.worker sets it for every job.
            env = (
                {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if recipe == "fast" else {}
            )
            results += run_child(cmd, logf, left, extra, env)
    with open(args.out / "results.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    log("\n" + summarise(results, args.out))
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
