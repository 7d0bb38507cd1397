"""The launcher hands vLLM the LoRA kernel tiles tuned on the H200 (server/lora_configs.py):
the files are where vLLM looks, named as vLLM names that GPU, hold the tiles the tuning run
measured best, and are found by vLLM's lookup for decode and prefill sizes alike.

vLLM reads them only on CUDA (its lookup asks CUDA for the GPU's name), so the lookup is
walked here as vLLM 0.26-0.32 walks it (vllm/lora/ops/triton_ops/utils.py); on the H200
the served run logged "Using tuned LoRA kernel configs from .../NVIDIA_H200_SHRINK.json"
(bench/results/h200-run34-logs.tar.gz).
"""

from __future__ import annotations

import json
from pathlib import Path

from server import lora_configs
from server.launcher import ServerConfig, build_env

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "results" / "h200-run31-lora-tune.json"


def _nearest(table: dict, key: int):
    """vLLM's step of its lookup: the exact key, else the numerically nearest one."""
    return table.get(str(key)) or table[min(table, key=lambda x: abs(int(x) - key))]


def _lookup(table: dict, max_loras: int, slices: int, tokens: int, k: int, n: int) -> dict:
    t = _nearest(table, max_loras + 1)[str(slices)]
    return _nearest(_nearest(_nearest(t, tokens), k), n)


def test_the_launcher_points_vllm_at_the_tuned_files_unless_the_operator_did(tmp_path):
    cfg = ServerConfig(model="/m", data_dir=tmp_path, served_model_name="base")
    assert build_env(cfg, {})[lora_configs.ENV] == str(lora_configs.folder())
    assert build_env(cfg, {lora_configs.ENV: "/mine"})[lora_configs.ENV] == "/mine"


def test_the_files_hold_the_measured_best_tiles_where_vllm_looks():
    folder = lora_configs.write()
    assert lora_configs.write() == folder  # written once, found again
    # vLLM's file name for the GPU nvidia-smi calls "NVIDIA H200".
    gpu = "NVIDIA H200".replace(" ", "_").replace("-", "_")
    shrink = json.loads((folder / f"{gpu}_SHRINK.json").read_text())
    expand = {add: json.loads((folder / f"{gpu}_EXPAND_{add}.json").read_text())
              for add in ("TRUE", "FALSE")}  # fmt: skip
    assert expand["TRUE"] == expand["FALSE"]
    # Each layer's best tile of the tuning run; o and down expand alike (the later wins,
    # as it did in the file the served run read).
    best = {}
    for row in json.loads(RUN.read_text()):
        best[(row["op"], row["slices"], row["k"], row["n"])] = row["best"]
    assert len(best) == 7
    for (op, slices, k, n), tiles in best.items():
        table = shrink if op == "shrink" else expand["TRUE"]
        for max_loras in (4, 8, 32):  # vLLM takes the nearest key: one table serves all
            assert _lookup(table, max_loras, slices, 64, k, n) == tiles
            assert _lookup(table, max_loras, slices, 48, k, n) == tiles  # a fuller batch
        # Prefill-sized batches keep vLLM's defaults.
        assert _lookup(table, 8, slices, 8192, k, n) == lora_configs.default_config(
            op, 8192, slices
        )
