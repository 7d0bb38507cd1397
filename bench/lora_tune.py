"""LoRA kernel configs for this GPU: vLLM's own shrink/expand ops, timed per tile shape.

    python3 bench/lora_tune.py --out DIR [--max-loras 8] [--tokens 64] [--active 8]

vLLM 0.26 picks each Triton LoRA kernel's tiles from ``VLLM_TUNED_CONFIG_FOLDER``
(``<GPU>_SHRINK.json``, ``<GPU>_EXPAND_{TRUE,FALSE}.json``, keyed by max LoRAs + 1, slices,
tokens, K and N), else from defaults that log "Using default LoRA kernel configs". At
decode sizes the default shrink splits K 64 ways with 256-wide blocks: for K = 4096 three
quarters of its CTAs find no K left and still add zeros atomically. This times, for the
Llama 3.1 8B shapes at rank 64 (q/k/v, o, gate/up and down, as vLLM stacks them), each
candidate config of ``lora_shrink`` and ``lora_expand`` in a CUDA graph
(``triton.testing.do_bench_cudagraph``) with ``--tokens`` tokens spread over ``--active``
adapters in a batch of ``--max-loras`` slots, beside vLLM's default, and writes the best
as vLLM's config files (layout: ``server/lora_configs.py``, which carries the H200's):
the decode size tuned, the prefill sizes at vLLM's defaults. Candidates are compiled first
in parallel processes (Triton's disk cache), then timed in one. o and down expand alike
(64 -> 4096): one config serves both, timed once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from server.lora_configs import default_config, vllm_files

HIDDEN, INTER, Q, KV, RANK = 4096, 14336, 4096, 1024, 64
# (layer, input K, output widths of the stacked slices), as vLLM's LoRA layers stack them.
SHAPES = [
    ("qkv", HIDDEN, (Q, KV, KV)),
    ("o", Q, (HIDDEN,)),
    ("gate_up", HIDDEN, (INTER, INTER)),
    ("down", INTER, (HIDDEN,)),
]


def candidates(op: str, k: int) -> list[dict[str, Any]]:
    out = []
    if op == "shrink":
        for bm, bn, bk, per in itertools.product((16, 32), (16, 32, 64), (64, 128, 256), (1, 2)):
            if k % (bk * per) == 0:
                out.append(
                    {
                        "block_m": bm,
                        "block_n": bn,
                        "block_k": bk,
                        "split_k": k // (bk * per),
                        "num_warps": 4,
                        "num_ctas": 1,
                        "group_size_m": 8,
                        "num_stages": 2,
                        "max_nreg": None,
                    }
                )
    else:
        for bm, bn, bk, warps in itertools.product((16, 64), (64, 128, 256), (32, 64), (4, 8)):
            out.append(
                {
                    "block_m": bm,
                    "block_n": bn,
                    "block_k": bk,
                    "num_warps": warps,
                    "num_ctas": 1,
                    "num_stages": 2,
                    "max_nreg": None,
                }
            )
    return out


class Case:
    """One op on one layer's shape, with its weights and batch metadata on the GPU."""

    def __init__(self, op: str, shape: tuple, tokens: int, active: int, max_loras: int) -> None:
        import torch
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

        self.op, (self.layer, self.k, self.widths) = op, shape
        dev, bf16 = "cuda", torch.bfloat16
        self.x = torch.randn(tokens, self.k, device=dev, dtype=bf16)
        self.a = [
            torch.randn(max_loras, RANK, self.k, device=dev, dtype=bf16) / 64 for _ in self.widths
        ]
        self.b = [torch.randn(max_loras, w, RANK, device=dev, dtype=bf16) / 8 for w in self.widths]
        self.buf = torch.zeros(len(self.widths), tokens, RANK, device=dev, dtype=torch.float32)
        self.y = torch.zeros(tokens, sum(self.widths), device=dev, dtype=bf16)
        mapping = torch.arange(tokens, device=dev, dtype=torch.int32) % active
        self.meta = LoRAKernelMeta.make(max_loras, tokens, dev)
        self.meta.prepare_tensors(mapping)
        self.args = self.meta.meta_args(tokens, False)  # grid over all slots, as by default

    def key(self) -> tuple[int, int, int]:
        """(slices, K, N) as vLLM looks the config up."""
        if self.op == "shrink":
            return len(self.widths), self.k, RANK
        return len(self.widths), RANK, max(self.widths)

    def run(self, config: dict[str, Any]) -> None:
        """The op with ``config`` in place of the looked-up one."""
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

        module = lora_shrink_op if self.op == "shrink" else lora_expand_op
        module.get_lora_op_configs = lambda *a, **kw: config
        if self.op == "shrink":
            lora_shrink_op._lora_shrink(self.x, self.a, self.buf, *self.args, 1.0)
        else:
            lora_expand_op._lora_expand(
                self.buf, self.b, self.y, *self.args, offset_start=0, add_inputs=True
            )


def _compile(job: tuple) -> int:
    """In a worker process: run each config once (Triton compiles it into its disk cache)."""
    op, shape, tokens, active, max_loras, configs = job
    case = Case(op, shape, tokens, active, max_loras)
    bad = 0
    for config in configs:
        try:
            case.run(config)
        except Exception:
            bad += 1
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="VLLM_TUNED_CONFIG_FOLDER to write")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="decode batch: tokens in a step")
    p.add_argument("--active", type=int, default=8, help="adapters among those tokens")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--report", type=Path, default=None, help="JSON of every timing")
    args = p.parse_args(argv)
    import torch
    import triton

    t0 = time.time()
    jobs = []
    for op, shape in itertools.product(("shrink", "expand"), SHAPES):
        configs = candidates(op, shape[1])
        for i in range(0, len(configs), 8):
            jobs.append((op, shape, args.tokens, args.active, args.max_loras, configs[i : i + 8]))
    with ProcessPoolExecutor(args.workers) as pool:
        failed = sum(pool.map(_compile, jobs))
    print(
        f"compiled {sum(len(j[-1]) for j in jobs)} configs in {time.time() - t0:.0f}s "
        f"({failed} failed)",
        flush=True,
    )
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("-", "_")
    tuned: dict[str, dict] = {"shrink": {}, "expand": {}}
    report = []
    for op, shape in itertools.product(("shrink", "expand"), SHAPES):
        case = Case(op, shape, args.tokens, args.active, args.max_loras)
        slices, k, n = case.key()
        if (slices, k, n) in tuned[op]:
            continue  # the same kernel on the same shape as a layer already timed
        timed = []
        default = default_config(op, args.tokens, slices)
        for config in [default, *candidates(op, shape[1])]:
            try:
                ms = triton.testing.do_bench_cudagraph(
                    lambda c=config, case=case: case.run(c), rep=20
                )
            except Exception as e:
                print(f"  {op} {shape[0]} {config}: {e!r}"[:300])
                continue
            timed.append((ms, config))
        best_ms, best = min(timed, key=lambda t: t[0])
        default_ms = timed[0][0]
        line = {
            "op": op,
            "layer": shape[0],
            "slices": slices,
            "k": k,
            "n": n,
            "default_us": round(default_ms * 1e3, 2),
            "best_us": round(best_ms * 1e3, 2),
            "speedup": round(default_ms / best_ms, 2),
            "best": best,
        }
        report.append(line)
        print(json.dumps(line), flush=True)
        tuned[op][(slices, k, n)] = best
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in vllm_files(tuned, gpu).items():
        (args.out / name).write_text(json.dumps(table, indent=1))
    total_default = sum(r["default_us"] for r in report)
    total_best = sum(r["best_us"] for r in report)
    print(
        f"one layer's LoRA ops: {total_default:.1f} us by default, {total_best:.1f} us tuned "
        f"({total_default / total_best:.2f}x); {time.time() - t0:.0f}s"
    )
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
