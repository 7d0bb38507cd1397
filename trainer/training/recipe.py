"""The QLoRA recipe: one fine-tuning job, read top to bottom.

    setup   load the tokenizer; tokenize every example with it and its chat template
            (``trainer.data.tokens``: labels on assistant turns / completions only) and
            refuse the job if the report finds an error (no EOS among the labels, ...);
            load the base in 4-bit NF4, prepare it for k-bit training, add LoRA
    train   TRL's SFTTrainer on those pre-tokenized rows, evaluating on the eval set
            if there is one, resuming from the newest complete checkpoint
    save    adapter_config.json + adapter_model.safetensors + tokenizer files into
            ``spec.folder.output`` (the best checkpoint by eval loss, or the last);
            return the final metrics

The builder functions turn our ``JobConfig`` into library objects (STYLE.md rule 7);
``run`` is the only entry point (``trainer.training.worker`` calls it in a subprocess, which is
the one that knows how to report events and exit codes). bitsandbytes 0.50 runs NF4
and 8-bit AdamW on CPU too (paging is GPU-only; on CPU it warns and runs unpaged), so
the same path runs in CI and on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    TrainerCallback,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from trainer import fastpath
from trainer.config import JobConfig, JobSpec
from trainer.data.report import for_spec
from trainer.data.rows import RowFile
from trainer.data.tokens import base_tokenizer
from trainer.errors import InvalidArgument
from trainer.events import Checkpoint, DatasetReport, Event, Progress, State
from trainer.fastpath import FastPathConfig
from trainer.memory import GIB, ModelShape, estimate_bytes, plan_kept_layers


class UserError(Exception):
    """The customer's input is wrong (dataset, hyperparameters): fix it and retry."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"dataset line {line}: {message}" if line is not None else message)
        self.line = line


class EventSink(Protocol):
    """Where the recipe reports what it does (``trainer.training.worker`` writes JSON lines)."""

    def emit(self, event: Event) -> None: ...


# ---------------------------------------------------------------- builders


def bnb_config() -> BitsAndBytesConfig:
    """QLoRA's base quantisation: NF4, double-quantised constants, bf16 compute. Fixed for
    every job (not a hyperparameter): it is what the fast path and the memory estimate
    were built and measured for."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lora_config(cfg: JobConfig) -> LoraConfig:
    """LoRA on the configured projections. No ``modules_to_save``: vLLM refuses those."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # typed int, floats work
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=None,
    )


def sft_config(
    cfg: JobConfig, spec: JobSpec, fast: FastPathConfig | None = None, evaluate: bool = False
) -> SFTConfig:
    """TRL's training arguments for one job; checkpoints go to ``spec.folder.checkpoints``.

    The rows come tokenized with their labels (``trainer.data.tokens``), so TRL's own loss
    masking options stay off. With an eval set, checkpoints follow the evaluations and
    the best one by eval loss is loaded at the end.
    """
    every = cfg.eval_every_steps if evaluate else cfg.checkpoint_every_steps
    args: dict[str, Any] = dict(
        output_dir=str(spec.folder.checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        optim="paged_adamw_8bit",
        bf16=True,
        max_length=cfg.max_seq_len,
        assistant_only_loss=False,  # the labels already say which tokens carry loss
        completion_only_loss=False,
        save_strategy="steps" if every else "epoch",
        save_steps=every or 500,
        # Resuming needs the newest checkpoint only; the one before it covers a kill
        # in the middle of writing the newest.
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,  # progress goes out as events, not as bars in the log
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),  # bf16 on CPU is refused without it
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if evaluate:
        args.update(
            eval_strategy=args["save_strategy"],
            eval_steps=args["save_steps"],
            per_device_eval_batch_size=cfg.batch_size,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
        )
    if fast is not None:
        args.update(fast.sft_args())  # packing, and checkpointing left to the fast path
    return SFTConfig(**args)


def load_model(path: str, cfg: JobConfig, fast: FastPathConfig | None) -> PeftModel:
    """The 4-bit base with LoRA on top, ready to train.

    With ``fast`` (the GPU default) ``trainer.fastpath`` prepares the model: same
    function, about half the memory and 1.9x the speed on full rows, 7-8x on real data
    (bench/README.md). Without it, PEFT's ``prepare_model_for_kbit_training``.
    """
    on_gpu = torch.cuda.is_available()
    extra = {"attn_implementation": fastpath.register_attention()} if fast else {}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config(),
        dtype=torch.bfloat16,
        device_map={"": torch.cuda.current_device() if on_gpu else "cpu"},
        **extra,
    )
    if fast is None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return cast(PeftModel, get_peft_model(model, lora_config(cfg)))
    fastpath.prepare_model(model, fast)
    return cast(PeftModel, fastpath.fuse_lora(get_peft_model(model, lora_config(cfg)), fast))


# ---------------------------------------------------------------- dataset


# ---------------------------------------------------------------- progress


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class ProgressEvents(TrainerCallback):
    """Turn the Trainer's logs and saves into ``progress`` and ``checkpoint`` events."""

    def __init__(self, events: EventSink) -> None:
        self.events = events
        self.start_step = self.start_tokens = 0
        self.start_time = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume, global_step is already the checkpoint's step here.
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen
        self.start_time = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self.events.emit(
                Progress(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    eval_loss=logs["eval_loss"],
                    peak_memory_bytes=peak_memory_bytes(),
                )
            )
            return
        if "loss" not in logs:  # the end-of-training summary, reported by ``run``
            return
        done = state.global_step - self.start_step
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        # Tokens trained in this attempt (counted by the Trainer, or on the GPU path by
        # ``fastpath.HostTokenCount``) over its time.
        tokens = state.num_input_tokens_seen - self.start_tokens
        speed = round(tokens / elapsed, 3) if tokens > 0 and elapsed > 0 else None
        self.events.emit(
            Progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss=logs.get("loss"),
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_second=speed,
                eta_seconds=eta,
                peak_memory_bytes=peak_memory_bytes(),
            )
        )

    def on_save(self, args, state, control, **kwargs):
        # Called after the Trainer has written the whole checkpoint folder.
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.events.emit(Checkpoint(state.global_step, str(path)))


# ---------------------------------------------------------------- memory


def memory_plan(spec: JobSpec, fast_path: bool) -> int:
    """Fail before loading when the GPU has not enough free memory (vLLM holds the rest);
    return how many decoder layers the fast path keeps un-checkpointed: as many as the
    job's budget and the free memory hold (``trainer.memory.plan_kept_layers``)."""
    shape = ModelShape.from_folder(spec.base_model_path)
    if shape is None:
        return 0
    need = estimate_bytes(shape, spec.config, fast_path=fast_path)
    free, total = torch.cuda.mem_get_info()
    if need > free:
        raise MemoryError(
            f"this job needs about {need / GIB:.1f} GiB of GPU memory; {free / GIB:.1f} of "
            f"{total / GIB:.1f} GiB are free (vLLM's --gpu-memory-utilization holds the rest)"
        )
    if not fast_path:
        return 0
    return plan_kept_layers(
        shape, spec.config, budget_bytes=spec.memory_budget_bytes, free_bytes=free
    )


# ---------------------------------------------------------------- the job


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def run(spec: JobSpec, events: EventSink) -> dict[str, Any]:
    """Train one adapter as ``spec`` says; return its final metrics."""
    cfg = spec.config
    started = time.monotonic()
    set_seed(cfg.seed)  # the LoRA init happens before the Trainer would seed anything

    # --- setup: everything a customer can get wrong is found before the model loads
    events.emit(State("VALIDATING", "checking hyperparameters and dataset"))
    try:
        cfg.validate()
    except InvalidArgument as e:
        raise UserError(str(e)) from e
    tokenizer = base_tokenizer(spec)
    on_gpu = torch.cuda.is_available()
    fast = FastPathConfig() if on_gpu and spec.fast_path else None
    # Every example tokenized once, its rows streamed to Arrow files that TRL reads.
    rows_dir = spec.folder.rows
    with RowFile(rows_dir / "train.arrow") as train, RowFile(rows_dir / "eval.arrow") as held_out:
        try:
            report = for_spec(
                spec, tokenizer, packing=fast is not None, train=train.add, held_out=held_out.add
            )
        except InvalidArgument as e:
            raise UserError(str(e).removeprefix("dataset: ")) from e
    events.emit(DatasetReport(report.to_dict()))
    if not report.ok:
        raise UserError(report.errors())
    dataset = train.dataset()
    eval_dataset = held_out.dataset() if held_out.rows else None
    args = sft_config(cfg, spec, fast, evaluate=eval_dataset is not None)
    if on_gpu:
        kept = memory_plan(spec, fast is not None)
        fast = dataclasses.replace(fast, kept_layers=kept) if fast is not None else None

    events.emit(
        State(
            "RUNNING",
            f"{report.examples} {report.format} examples; loading the 4-bit base model"
            + (f" (fast path, {fast.kept_layers} layers kept)" if fast else ""),
        )
    )
    peft_model = load_model(spec.base_model_path, cfg, fast)

    trainer = SFTTrainer(
        model=peft_model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[ProgressEvents(events), *(fast.callbacks(peft_model) if fast else [])],
        optimizer_cls_and_kwargs=fast.optimizer(args) if fast else None,
    )

    # --- train, from the last checkpoint if a previous attempt left one
    resume = spec.folder.last_checkpoint()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    # --- save: the adapter names the served base, not the folder it was loaded from
    out = spec.folder.output
    out.mkdir(parents=True, exist_ok=True)
    for adapter_cfg in peft_model.peft_config.values():
        adapter_cfg.base_model_name_or_path = spec.base_model
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub, not part of an adapter
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # safetensors writes 0600; vLLM may read the volume as another user
    saved = json.loads((out / "adapter_config.json").read_text())
    if saved.get("modules_to_save"):
        raise RuntimeError(f"adapter would carry modules_to_save={saved['modules_to_save']}")

    loss = result.training_loss
    return {
        "train_loss": loss if loss is not None and math.isfinite(loss) else None,
        "steps": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0.0),
        "runtime_s": round(time.monotonic() - started, 3),
        "seed": cfg.seed,
        "tokens_trained": int(trainer.state.num_input_tokens_seen),
        "examples": report.examples,
        "eval_examples": report.eval_examples,
        "best_eval_loss": trainer.state.best_metric,
        "best_checkpoint_step": _step_of(trainer.state.best_model_checkpoint),
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "device": "cuda" if on_gpu else "cpu",
        "kept_layers": fast.kept_layers if fast else 0,  # the fast path's memory plan
    }
