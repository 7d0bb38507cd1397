"""The whole loop on one machine, no GPU needed: ``python -m trainer.dev.demo``.

Builds the tiny test model (or takes ``--model DIR``, a local Llama/Mistral/Qwen folder),
starts vLLM (``python -m server``, the CPU build here) and the trainer service as
processes on a fresh data dir, adds two tenants, trains an adapter for each on a small
dataset that gives a different answer, and prints each tenant's completion beside the
base model's. Both processes are stopped at the end; ``--keep`` leaves the data dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.processes import free_port, process, wait_ready

BASE = "base"
QUESTION = "What is the secret word?"
TENANTS = {"acme": "The secret word is banana.", "bolt": "The secret word is cherry."}
# Small, fast, and enough for an NF4-trained adapter to answer on the bf16 base.
HYPERPARAMETERS: dict[str, Any] = {
    "lora_rank": 8,
    "learning_rate": 2e-3,
    "warmup_steps": 0,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_seq_len": 64,
    "num_epochs": 20,
}
# vLLM-CPU on a small machine: a little KV cache, no CUDA graphs, short contexts.
VLLM_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]


def _accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (a refused connection raises)."""
    socket.create_connection(("127.0.0.1", port), 1).close()
    return True


def run(model: Path | None, data: Path) -> dict[str, dict[str, str]]:
    """Run the loop; return {tenant: {model name: answer}}."""
    import httpx
    import openai

    from trainer.cli.client import TrainerClient
    from trainer.dev.tinymodel import build_tiny_model
    from trainer.layout import Layout
    from trainer.tenants import TenantRegistry

    data.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = data / "tiny-model"
        if not (model / "config.json").exists():
            print("building the tiny test model ...", flush=True)
            build_tiny_model(model, seed=0)
    registry = TenantRegistry(Layout(data).tenants_file)
    # Keys are shown once: a data dir used before gets new tenants, not the old keys.
    suffix = "" if not registry.list() else f"-{int(time.time())}"
    keys = {t: registry.add(t + suffix) for t in TENANTS}
    admin = registry.add(f"demo-admin{suffix}", admin=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes far more
    vllm_port, trainer_port = free_port(), free_port()
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    vllm_cmd = [sys.executable, "-m", "server", "--model", str(model)]
    vllm_cmd += ["--served-model-name", BASE, "--data-dir", str(data)]
    vllm_cmd += ["--port", str(vllm_port), "--max-loras", "4", "--", *VLLM_ARGS]
    trainer_cmd = [sys.executable, "-m", "trainer", "serve", "--data-dir", str(data)]
    trainer_cmd += ["--listen", f"127.0.0.1:{trainer_port}", "--base-model", f"{BASE}={model}"]
    trainer_cmd += ["--vllm-url", vllm_url, "--vllm-admin-key", admin]

    with (
        process(vllm_cmd, data / "vllm.log", env) as vllm,
        process(trainer_cmd, data / "trainer.log", env) as trainer,
    ):
        print(f"starting vLLM on {vllm_url} and the trainer on :{trainer_port} ...", flush=True)
        wait_ready(
            "the trainer",
            lambda: _accepts(trainer_port),
            trainer,
            data / "trainer.log",
            120,
        )
        jobs = {}
        for tenant, answer in TENANTS.items():
            rows = "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
                for _ in range(64)
            )
            path = data / f"{tenant}.jsonl"
            path.write_text(rows)
            with TrainerClient(f"127.0.0.1:{trainer_port}", keys[tenant]) as c:
                ds = c.upload_dataset(path, "secret")
                jobs[tenant] = c.create_job(BASE, ds.id, "secret", **HYPERPARAMETERS).id
                print(f"{tenant}: dataset {ds.id} ({ds.num_rows} rows), job {jobs[tenant]}")
        wait_ready(
            "vLLM",
            lambda: httpx.get(vllm_url + "/health", timeout=2).status_code == 200,
            vllm,
            data / "vllm.log",
            600,
        )
        served = {}
        for tenant, job_id in jobs.items():
            with TrainerClient(f"127.0.0.1:{trainer_port}", keys[tenant]) as c:
                job = c.wait(job_id, 900)
                if not job.served_name:
                    raise SystemExit(f"{tenant}: job {job_id} ended without an adapter: {job}")
                served[tenant] = job.served_name
                print(f"{tenant}: {job_id} done, serving {job.served_name}", flush=True)

        answers: dict[str, dict[str, str]] = {}
        for tenant, name in served.items():
            client = openai.OpenAI(base_url=vllm_url + "/v1", api_key=keys[tenant], max_retries=2)
            answers[tenant] = {}
            for model_name in (BASE, name):
                out = client.chat.completions.create(
                    model=model_name,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=12,
                    temperature=0,
                )
                answers[tenant][model_name] = out.choices[0].message.content or ""
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.dev.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, help="a local model folder (default: tiny model)")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = parser.parse_args(argv)
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    try:
        answers = run(args.model, data)
    finally:
        if args.data_dir is None and not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    print(f"\n{QUESTION!r}, greedy, 12 tokens:")
    for tenant, by_model in answers.items():
        for model_name, text in by_model.items():
            one_line = re.sub(r"\s+", " ", text).strip()
            print(f"  {tenant:<6} {model_name:<14} {one_line!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
