"""Tile sizes for vLLM's LoRA kernels, tuned per GPU, handed to vLLM by the launcher.

vLLM's Triton LoRA kernels (``lora_shrink``, ``lora_expand``; the same code from 0.26 to
0.32) read their tiles from ``VLLM_TUNED_CONFIG_FOLDER`` (``<GPU>_SHRINK.json`` and
``<GPU>_EXPAND_{TRUE,FALSE}.json``, ``<GPU>`` being ``torch.cuda.get_device_name()`` with
spaces and dashes made underscores), else from defaults ("Using default LoRA kernel
configs"). At decode sizes the default shrink splits K 64 ways in blocks of 256, so for
K = 4096 three quarters of its CTAs find nothing to add but still add it atomically.

On an H200, 64 decode tokens over 8 adapters of rank 64 at Llama 3.1 8B's shapes, one
layer's LoRA ops took 209 us with the defaults and 83 us with the tiles below
(``bench/lora_tune.py``, bench/results/h200-run31-lora-tune.json). Served with them, 8
adapters ran at 4,615 output tokens/s against 3,581 (the base: 6,622 and 6,705), 32
adapters at 2,077 against 1,521 (run 33). Only that decode size is tuned; the file keeps
vLLM's defaults for prefill-sized batches. vLLM keys the tiles by max LoRAs + 1 and takes
the nearest key, so these (tuned at ``--max-loras 8``) serve any ``--max-loras``. A GPU
without an entry here keeps vLLM's defaults. vLLM's CPU build does not read the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENV = "VLLM_TUNED_CONFIG_FOLDER"
DECODE_TOKENS = 64
PREFILL_TOKENS = (512, 2048, 8192)
MAX_LORAS_KEY = "9"  # tuned with --max-loras 8: vLLM's key is the length of its lora_ids

Key = tuple[int, int, int]  # (slices, K, N) as vLLM looks a config up


def _shrink(bm: int, bn: int, bk: int, split: int) -> dict[str, Any]:
    return {"block_m": bm, "block_n": bn, "block_k": bk, "split_k": split, "num_warps": 4,
            "num_ctas": 1, "group_size_m": 8, "num_stages": 2, "max_nreg": None}  # fmt: skip


def _expand(bm: int, bn: int, bk: int, warps: int) -> dict[str, Any]:
    return {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_ctas": 1,
            "num_stages": 2, "max_nreg": None}  # fmt: skip


# GPU name -> op -> (slices, K, N) -> tiles, for rank 64 at Llama 3.1 8B's shapes:
# q/k/v (3 slices), o, gate/up (2), down. o and down expand alike (64 -> 4096).
TUNED: dict[str, dict[str, dict[Key, dict[str, Any]]]] = {
    "NVIDIA_H200": {
        "shrink": {
            (3, 4096, 64): _shrink(32, 32, 256, 8),
            (1, 4096, 64): _shrink(16, 32, 128, 16),
            (2, 4096, 64): _shrink(32, 64, 256, 16),
            (1, 14336, 64): _shrink(16, 64, 128, 56),
        },
        "expand": {
            (3, 64, 4096): _expand(16, 128, 32, 4),
            (1, 64, 4096): _expand(64, 256, 32, 8),
            (2, 64, 14336): _expand(16, 256, 32, 4),
        },
    }
}


def default_config(op: str, tokens: int, slices: int) -> dict[str, Any]:
    """vLLM's own tiles (``get_lora_op_configs`` in vllm/lora/ops/triton_ops/utils.py)."""
    if op == "shrink":
        small = tokens < 128
        return _shrink(32, 16, 256 if small else 32, 64 if small else 8)
    return _expand(64, 64 if slices > 1 else 128, 32, 4)


def vllm_files(tuned: dict[str, dict[Key, dict[str, Any]]], gpu: str) -> dict[str, Any]:
    """vLLM's files for one GPU: file name -> [max LoRAs][slices][tokens][K][N] -> tiles."""
    out = {}
    for op, configs in tuned.items():
        table: dict[str, Any] = {}
        for (slices, k, n), best in configs.items():
            by_tokens = table.setdefault(str(slices), {})
            by_tokens.setdefault(str(DECODE_TOKENS), {}).setdefault(str(k), {})[str(n)] = best
            for tokens in PREFILL_TOKENS:
                fallback = default_config(op, tokens, slices)
                by_tokens.setdefault(str(tokens), {}).setdefault(str(k), {})[str(n)] = fallback
        names = [f"{gpu}_SHRINK.json"] if op == "shrink" else [
            f"{gpu}_EXPAND_TRUE.json", f"{gpu}_EXPAND_FALSE.json"]  # fmt: skip
        for name in names:
            out[name] = {MAX_LORAS_KEY: table}
    return out


def _contents() -> dict[str, bytes]:
    files = {}
    for gpu, tuned in TUNED.items():
        for name, table in vllm_files(tuned, gpu).items():
            files[name] = json.dumps(table, indent=1, sort_keys=True).encode()
    return files


def folder() -> Path:
    """Where the files are (a folder named by their content, so any version finds its own)."""
    digest = hashlib.sha256(json.dumps(sorted(_contents().items()), default=str).encode())
    return Path(tempfile.gettempdir()) / f"finetune-lora-configs-{digest.hexdigest()[:16]}"


def write() -> Path:
    """Write the files into ``folder()`` if they are not there yet; return the folder."""
    target = folder()
    if target.is_dir():
        return target
    stage = Path(tempfile.mkdtemp(prefix=".finetune-lora-configs-", dir=target.parent))
    for name, data in _contents().items():
        (stage / name).write_bytes(data)
        (stage / name).chmod(0o644)
    stage.chmod(0o755)
    try:
        os.rename(stage, target)
    except OSError:  # another launcher got there first: its files are the same
        for f in stage.iterdir():
            f.unlink()
        stage.rmdir()
    return target
