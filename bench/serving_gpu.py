"""Serving on one GPU beside the trainer, measured in one run (issue 20).

    python3 bench/serving_gpu.py --out $OUT [--budget-s 570]                    # on the GPU
    python3 bench/serving_gpu.py --phases variants --variants plain,dual --out $OUT
    python bench/serving_gpu.py --smoke --out /tmp/smoke     # the same flow, tiny, on a CPU

``--phases main`` (the default), on one GPU in one run:

1. An 8B-shaped Llama (Llama 3.1 8B dimensions, random bf16 weights, max length 8192)
   with a word-level tokenizer over all 128,256 ids and a Llama-3 chat template, in
   /dev/shm; 32 random r=64 adapters on all seven projections, saved by PEFT and published
   through the product's ``Publisher`` (4 weight sets, each under 8 names: a kernel's cost
   does not depend on the values).
2. The product as the GPU compose file starts it (``python -m server ... --max-loras 8
   --max-cpu-loras 32 --max-lora-rank 64 -- --gpu-memory-utilization 0.55 --max-model-len
   8192 --quantization ''``: the compose file's flags with this card's .env values for the
   LoRA limits; resolver plugin, tenant middleware; the launcher now also passes
   tuned LoRA kernel tiles, added after run 34) and the trainer (``python
   -m trainer serve --gpu-memory-budget 0.40 --vllm-url ...``) on the same card. Once the
   product has sized its KV cache, vLLM alone starts beside it: no plugin, no middleware,
   vLLM's defaults except the same LoRA limits and a fixed 16 GiB KV cache (so both fit,
   and neither's memory profile sees the other start).
3. Start to healthy of each; ``load_lora_adapter`` latency of 32 adapters on each.
4. 64 concurrent streamed completions (256 prompt tokens, 128 output tokens, ignore_eos)
   on the base, then spread over 1, 8 and 32 adapters, on each server in turn: output
   tokens/s, TTFT and ITL p50/p99, and the ratio to the same server's base.
5. A real job through the trainer's gRPC API: r=64 on all seven projections, the fast
   path, 16 optimizer steps of 32,768 tokens (2,048 chat examples of 256 tokens, packed);
   its steps 2-8 run alone, then a steady load (the same 64 streams over 8 adapters) runs
   on the product until the job ends: training tokens/s alone and under load, serving
   TTFT/ITL under training. Then the job's SUCCEEDED to its adapter's first streamed token.
6. Parity of the trained, served adapter with PEFT on the same bf16 base (bench/parity.py).

``--phases prepare`` only builds the model and publishes the adapters (kept in ``--work``
for a later call). ``--phases variants`` starts the product once per ``--variants`` entry,
all at once, each with a fixed 4 GiB KV cache (the 24,576 tokens in flight need 3 GiB),
and measures step 4 on each in turn. The entries, joined with ``+``: ``plain`` (vLLM's
default LoRA kernel tiles); ``tuned`` (the launcher's tiles, server/lora_configs.py) or
``retuned`` (those bench/lora_tune.py wrote into ``--work`` in this call); vLLM's LoRA
options ``dual`` (VLLM_LORA_ENABLE_DUAL_STREAM) and ``specialize``
(--specialize-active-lora); ``nf4`` (--quantization bitsandbytes); ``loras4``, ``loras32``
(--max-loras). In runs 33-34 the launcher set no tiles: ``tuned`` there was ``retuned``.

Results go to ``OUT/serving-gpu.json`` (rewritten after each step) and ``OUT/logs.tar.gz``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.servers import (  # noqa: E402
    ADAPTERS,
    BASE,
    START,
    TENANT,
    Server,
    alone_cmd,
    base_env,
    gpu_memory,
    load_adapters,
    loaded_memory,
    log,
    product_cmd,
    versions,
)
from bench.tokenwords import build_model, chat_rows, word_ids  # noqa: E402
from trainer.processes import free_port  # noqa: E402

DISTINCT = 4  # weight sets among the ADAPTERS published
COUNTS = (1, 8, 32)
GIB = 1 << 30


class Settings:
    """The sizes of a run: the GPU's, or a tiny one for this CPU (``--smoke``)."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.concurrency = 8 if smoke else 64
        self.prompt_len, self.out_len = (32, 8) if smoke else (256, 128)
        self.requests = 2 * self.concurrency if smoke else 3 * self.concurrency
        self.rank = 8 if smoke else 64
        self.examples, self.example_len = (64, 64) if smoke else (2048, 256)
        self.load_at_step = 2 if smoke else 8
        # Engine flags of the compose file's vllm service (values of .env for this card).
        self.product_engine = (
            ["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]
            if smoke
            else [
                "--gpu-memory-utilization",
                "0.55",
                "--max-model-len",
                "8192",
                "--quantization",
                "",
            ]
        )
        self.alone_engine = (
            ["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]
            if smoke
            # The fixed KV size skips the memory profile; vLLM still checks its (default 0.92)
            # utilization against the memory free at start, with the product loaded.
            else ["--gpu-memory-utilization", "0.35", "--kv-cache-memory-bytes", str(16 * GIB)]
        )
        self.variant_engine = (
            self.alone_engine
            if smoke
            else [
                "--max-model-len",
                "8192",
                "--gpu-memory-utilization",
                "0.15",
                "--kv-cache-memory-bytes",
                str(4 * GIB),
            ]
        )
        self.trainer_budget = "0.40"


# ------------------------------------------------------------------ adapters


def publish_random_adapters(model: Path, data: Path, rank: int, work: Path) -> list[Path]:
    """``ADAPTERS`` random LoRAs saved by PEFT, published by the product's Publisher."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.adapter_store import LocalAdapterStore
    from trainer.config import ALL_PROJECTIONS
    from trainer.layout import Layout
    from trainer.service.publish import Publisher
    from trainer.service.store import SqliteStore

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    peft_model = get_peft_model(
        meta, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_PROJECTIONS))
    )
    peft_model.peft_config["default"].base_model_name_or_path = BASE
    sources = []
    gen = torch.Generator().manual_seed(0)
    for d in range(DISTINCT):
        for name, module in peft_model.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                shape = module.weight.shape
                # A's rows of unit gain, B small: each projection's delta is about half of the
                # random base's output, so 32 layers of it stay finite in bf16.
                std = shape[1] ** -0.5 if name.endswith("lora_A.default") else 0.03
                w = torch.randn(shape, generator=gen, dtype=torch.float32) * std
                module.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
        src = work / f"random-{d}"
        peft_model.save_pretrained(src, save_embedding_layers=False)
        sources.append(src)
    layout = Layout(data).create()
    publisher = Publisher(LocalAdapterStore(layout), SqliteStore(layout.db), max_lora_rank=64)
    folders = []
    for i in range(ADAPTERS):
        manifest = publisher.manifest(
            job_id=f"random-{i}",
            tenant=TENANT,
            adapter=f"a{i}",
            base_model=BASE,
            dataset_sha256="",
            hyperparameters={},
            metrics={},
        )
        version = asyncio.run(publisher.publish(TENANT, f"a{i}", sources[i % DISTINCT], manifest))
        folders.append(layout.version_dir(TENANT, f"a{i}", version))
    return folders


# ------------------------------------------------------------------ throughput


def throughput(server: Server, key: str, s: Settings, vocab: int, first: int, bos: int) -> dict:
    """The base, then 1, 8 and 32 adapters: 64 streams each, after a short warm-up."""
    rows = {}
    for n in (0, *COUNTS):
        models = [BASE] if n == 0 else [f"{TENANT}/a{i}" for i in range(n)]
        warm = loadgen.prompts(s.concurrency, s.prompt_len, first, vocab, bos, seed=1000 + n)
        asyncio.run(loadgen.run(server.url, key, models, warm, 8, s.concurrency, s.concurrency))
        ids = loadgen.prompts(s.requests, s.prompt_len, first, vocab, bos, seed=n)
        row = asyncio.run(
            loadgen.run(server.url, key, models, ids, s.out_len, s.concurrency, s.requests)
        )
        assert row["error_count"] == 0, (server.name, n, row["errors"])
        rows["base" if n == 0 else f"{n}_adapters"] = row
        log(
            f"{server.name} {n} adapters: {row['output_tokens_per_s']} tok/s, "
            f"TTFT p50 {row['ttft_p50_ms']} ms, ITL p50 {row['itl_p50_ms']} ms"
        )
    for _name, row in rows.items():
        row["vs_base"] = round(row["output_tokens_per_s"] / rows["base"]["output_tokens_per_s"], 3)
    return rows


# ------------------------------------------------------------------ training beside serving


def _step_times(client, job_id: str) -> dict[int, float]:
    """When each optimizer step's progress event was stored (the first event per step)."""
    times: dict[int, float] = {}
    for ev in client.job_events(job_id, settle_s=0):
        if ev.HasField("progress") and ev.progress.step and ev.progress.HasField("loss"):
            times.setdefault(ev.progress.step, ev.time.ToDatetime().timestamp())
    return times


def _rate(times: dict[int, float], a: int, b: int, tokens_per_step: int) -> float | None:
    if a not in times or b not in times or b <= a:
        return None
    return round(tokens_per_step * (b - a) / (times[b] - times[a]), 1)


def train_beside_serving(
    svc_addr: str,
    key: str,
    product: Server,
    s: Settings,
    data: Path,
    tokenizer_dir: Path,
    vocab: int,
    first: int,
    bos: int,
) -> dict:
    """A real job; a steady load on the product from step ``load_at_step`` to the end."""
    import threading

    from finetune.v1 import trainer_pb2 as pb
    from trainer.cli.client import TERMINAL, TrainerClient

    path = data / "bench-train.jsonl"
    with open(path, "w") as f:
        for row in chat_rows(tokenizer_dir, s.examples, s.example_len, seed=7):
            f.write(json.dumps(row) + "\n")
    hp = {
        "lora_rank": s.rank,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "num_epochs": 1,
        "batch_size": 4,
        "gradient_accumulation_steps": 4,
        "max_seq_len": 64 if s.smoke else 2048,
    }
    steady: dict[str, Any] = {}
    stop = threading.Event()
    models = [f"{TENANT}/a{i}" for i in range(8)]
    ids = loadgen.prompts(4096, s.prompt_len, first, vocab, bos, seed=99)

    def serve() -> None:
        steady.update(
            asyncio.run(
                loadgen.run(
                    product.url, key, models, ids, s.out_len, s.concurrency, until=stop.is_set
                )
            )
        )

    with TrainerClient(svc_addr, key) as c:
        ds = c.upload_dataset(path, "bench-train")
        t0 = time.monotonic()
        job = c.create_job(BASE, ds.id, "trained", **hp)
        loader = threading.Thread(target=serve)
        load_started = load_stopped = None
        while (job := c.get_job(job.id)).state not in TERMINAL:
            step, total = job.progress.step, job.progress.total_steps
            if load_started is None and step >= s.load_at_step:
                load_started = step
                loader.start()
                log(f"steady load on the product from step {step}")
            # Stop before the last step, so the load has drained when the job succeeds.
            if load_started is not None and load_stopped is None and step >= total - 1:
                load_stopped = step
                stop.set()
                log(f"steady load stopped at step {step} of {total}")
            time.sleep(0.05)
        succeeded = time.perf_counter()
        stop.set()
        if load_started is not None:
            loader.join()
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
        # The trainer hot-loaded the adapter before calling the job SUCCEEDED.
        first_token = asyncio.run(_first_token(product.url, key, job.served_name))
        ttft_after_success = first_token - succeeded
        times = _step_times(c, job.id)
        events = [
            {
                "step": e.progress.step,
                "time": e.time.ToDatetime().timestamp(),
                "state": e.state,
                "message": e.message,
                "tokens_per_second": e.progress.tokens_per_second,
            }
            for e in c.job_events(job.id, settle_s=0)
        ]
    tokens_per_step = 4 * 4 * hp["max_seq_len"]
    last = max(times) if times else 0
    return {
        "job": job.id,
        "served_name": job.served_name,
        "hyperparameters": hp,
        "wall_s": round(time.monotonic() - t0, 1),
        "steps": last,
        "load_started_at_step": load_started,
        # Step 1 compiles; steps 2 to the load's start ran with vLLM idle beside them.
        "training_tokens_per_s_alone": _rate(times, 2, load_started or last, tokens_per_step),
        "load_stopped_at_step": load_stopped,
        # The step running when the load starts is partly unloaded: the window starts after it.
        "training_tokens_per_s_under_load": _rate(
            times, (load_started or 0) + 1, load_stopped or last, tokens_per_step
        ),
        "serving_under_training": steady,
        "succeeded_to_first_token_ms": round(ttft_after_success * 1e3, 1),
        "events": events,
    }


async def _first_token(url: str, key: str, model: str) -> float:
    """Stream a chat completion from ``model``; the perf_counter time of its first token."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    stream = await client.completions.create(
        model=model, prompt="w5 w6 w7", max_tokens=4, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    t = time.perf_counter()
    await stream.close()
    return t


# ------------------------------------------------------------------ the run


VARIANTS: dict[str, tuple[dict[str, str], list[str], int | None]] = {
    # vLLM's default LoRA tiles: a folder without files for this GPU.
    "plain": ({"VLLM_TUNED_CONFIG_FOLDER": "{work}/no-tiles"}, [], None),
    "dual": ({"VLLM_LORA_ENABLE_DUAL_STREAM": "1"}, [], None),
    "specialize": ({}, ["--specialize-active-lora"], None),
    "tuned": ({}, [], None),  # the launcher's tiles (server/lora_configs.py)
    "retuned": ({"VLLM_TUNED_CONFIG_FOLDER": "{work}/lora-configs"}, [], None),
    "nf4": ({}, ["--quantization", "bitsandbytes"], None),
    "loras4": ({}, [], 4),  # the compose file's default FINETUNE_MAX_LORAS
    "loras32": ({}, [], 32),
}


class Run:
    """One run's state: where things are, the keys, and the results written as they come."""

    def __init__(self, args: argparse.Namespace) -> None:
        import tempfile

        self.args, self.s = args, Settings(args.smoke)
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or (tempfile.mkdtemp() if args.smoke else "/dev/shm/serving"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = build_model(self.work / "model", args.smoke)
        self.first, self.vocab, self.bos = word_ids(self.model)
        self.data = self.work / "data"
        self.result: dict[str, Any] = {"versions": versions(), "settings": vars(self.s)}
        self.servers: list[Server] = []
        self.trainer: subprocess.Popen | None = None

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - START)

    def save(self) -> None:
        (self.out / "serving-gpu.json").write_text(json.dumps(self.result, indent=1) + "\n")

    def prepare(self) -> None:
        """Tenants and the 32 published adapters (kept in ``work`` for a later phase)."""
        from trainer.tenants import TenantRegistry

        keys = self.work / "keys.json"
        if keys.exists():
            self.key, self.admin = json.loads(keys.read_text())
            self.folders = [
                self.data / "adapters" / TENANT / f"a{i}" / "v0001" for i in range(ADAPTERS)
            ]
            return
        self.data.mkdir(parents=True)
        registry = TenantRegistry(self.data / "tenants.json")
        self.key, self.admin = registry.add(TENANT), registry.add("ops", admin=True)
        t = time.monotonic()
        self.folders = publish_random_adapters(self.model, self.data, self.s.rank, self.work)
        log(f"published {ADAPTERS} adapters in {time.monotonic() - t:.0f}s")
        keys.write_text(json.dumps([self.key, self.admin]))

    def server(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Server:
        env = {**base_env(self.args.smoke), **(extra_env or {})}
        server = Server(name, cmd, env, self.out)
        self.servers.append(server)
        return server.start()

    def start_trainer(self, vllm_url: str) -> str:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "trainer",
            "serve",
            "--data-dir",
            str(self.data),
            "--listen",
            f"127.0.0.1:{port}",
            "--base-model",
            f"{BASE}={self.model}",
            "--vllm-url",
            vllm_url,
            "--vllm-admin-key",
            self.admin,
            "--max-lora-rank",
            "64",
            "--devices",
            "1",
            "--gpu-memory-budget",
            self.s.trainer_budget,
        ]
        path = self.out / "trainer.log"
        with open(path, "ab") as f:
            self.trainer = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=base_env(self.args.smoke),
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while "trainer listening on" not in path.read_text(errors="replace"):
            if self.trainer.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the trainer did not start; see {path}")
            time.sleep(0.5)
        return f"127.0.0.1:{port}"

    def stop_all(self) -> None:
        from trainer.processes import stop

        for server in self.servers:
            server.stop()
        if self.trainer is not None:
            stop(self.trainer, group=True)
            self.trainer = None

    def close(self) -> None:
        self.stop_all()
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(self.out.glob("*.log")):
                tar.add(p, arcname=p.name)
                p.unlink()
        self.save()


def main_phase(run: Run) -> None:
    s, r = run.s, run.result
    run.prepare()
    product = run.server("product", product_cmd(run.model, run.data, s.product_engine))
    svc = run.start_trainer(product.url)
    alone_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    if not s.smoke:  # start once the product has sized its KV cache: its profile is done
        product.wait(lambda: product.logged("Available KV cache memory"), "KV sizing", 900)
    alone = run.server("vllm-alone", alone_cmd(run.model, s.alone_engine), alone_env)
    product.wait_healthy(max(60, run.left() - 240))
    alone.wait_healthy(max(60, run.left() - 240))
    r["start_to_healthy_s"] = {
        "product": round(product.healthy_s, 1),
        "vllm_alone": round(alone.healthy_s, 1),
    }
    r["memory"] = {"product": loaded_memory(product), "vllm_alone": loaded_memory(alone)}
    r["gpu_memory_after_start"] = gpu_memory() if not s.smoke else []
    r["load_lora_adapter"] = {
        "product": load_adapters(product, run.admin, run.folders),
        "vllm_alone": load_adapters(alone, "", run.folders),
    }
    run.save()
    ids = (s, run.vocab, run.first, run.bos)
    r["throughput"] = {"vllm_alone": throughput(alone, "", *ids)}
    run.save()
    r["throughput"]["product"] = throughput(product, run.key, *ids)
    run.save()
    alone.stop()
    log(f"{run.left():.0f}s left before the training phase")
    if run.left() < 150:
        r["training"] = {"skipped": f"{run.left():.0f}s of the budget left"}
        return
    r["training"] = train_beside_serving(
        svc, run.key, product, s, run.data, run.model, run.vocab, run.first, run.bos
    )
    r["gpu_memory_after_training"] = gpu_memory() if not s.smoke else []
    run.save()
    log(f"training: {json.dumps({k: v for k, v in r['training'].items() if k != 'events'})}")
    if run.left() < 45:
        r["parity"] = {"skipped": f"{run.left():.0f}s of the budget left"}
        return
    r["parity"] = parity_check(run, product)
    log(f"parity: {json.dumps(r['parity'])}")
    run.stop_all()  # a later phase starts its own servers


def parity_check(run: Run, product: Server) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench import parity
    from trainer.layout import Layout

    tok = AutoTokenizer.from_pretrained(run.model)
    rows = chat_rows(run.model, 3, 64, seed=11)
    prompts = [
        list(
            tok.apply_chat_template(
                row["messages"][:1], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for row in rows
    ]
    name = f"{TENANT}/trained"
    samples = parity.served(product.url, run.key, name, prompts, max_tokens=16)
    folder = Layout(run.data).current_dir(TENANT, "trained")
    assert folder is not None
    device = "cpu" if run.s.smoke else "cuda"
    peft_lp, base_lp = parity.reference(run.model, folder, samples, device)
    return parity.compare(samples, peft_lp, base_lp)


def variants_phase(run: Run, names: list[str]) -> None:
    s = run.s
    run.prepare()
    servers = {}
    for name in names:
        env: dict[str, str] = {}
        flags: list[str] = []
        max_loras = 8
        for part in name.split("+"):
            e, f, loras = VARIANTS[part]
            env.update({k: v.format(work=run.work) for k, v in e.items()})
            flags += f
            max_loras = loras or max_loras
        folder = env.get("VLLM_TUNED_CONFIG_FOLDER", "")
        if folder.endswith("/lora-configs") and not Path(folder).is_dir():
            log(f"skip {name}: no tuned configs in {folder} (bench/lora_tune.py writes them)")
            continue
        engine = [*s.variant_engine, *flags]
        cmd = product_cmd(run.model, run.data, engine, max_loras)
        servers[name] = run.server(name, cmd, env)
    rows: dict[str, Any] = {}
    run.result["variants"] = rows
    for name, server in servers.items():
        # One variant that fails (to start, or to serve) leaves the others measured.
        try:
            server.wait_healthy(max(60, run.left() - 60))
            rows[name] = {"start_to_healthy_s": round(server.healthy_s, 1)}
        except SystemExit as e:
            rows[name] = {"failed": str(e), "log_tail": server.tail()}
            server.stop()
    for name, server in servers.items():
        if "failed" in rows[name]:
            continue
        if run.left() < 45:
            rows[name]["skipped"] = f"{run.left():.0f}s of the budget left"
            continue
        try:
            rows[name]["memory"] = loaded_memory(server)
            rows[name]["load_lora_adapter"] = load_adapters(server, run.admin, run.folders)
            rows[name]["throughput"] = throughput(server, run.key, s, run.vocab, run.first, run.bos)
        except Exception as e:  # recorded, and the next variant still runs
            rows[name]["failed"] = repr(e)[:500]
            rows[name]["log_tail"] = server.tail()
        run.save()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="model, data (default /dev/shm/serving)")
    p.add_argument("--phases", default="main", help="prepare, main, variants (comma-separated)")
    p.add_argument("--variants", default="plain,dual,specialize,tuned")
    p.add_argument("--budget-s", type=float, default=570.0)
    p.add_argument("--smoke", action="store_true", help="the tiny model on this CPU")
    args = p.parse_args(argv)
    run = Run(args)
    try:
        for phase in args.phases.split(","):
            if phase == "prepare":  # the model and the published adapters, for a later call
                run.prepare()
            elif phase == "main":
                main_phase(run)
            elif phase == "variants":
                variants_phase(run, args.variants.split(","))
            else:
                raise SystemExit(f"unknown phase {phase}")
    finally:
        run.result["wall_s"] = round(time.monotonic() - START, 1)
        run.close()
        log("done")


if __name__ == "__main__":
    main()
