"""Does the NVML path report what ``nvidia-smi`` reports? Run on the GPU machine.

Prints, for every GPU, ``nvidia-smi``'s total, used and reserved MiB beside
``trainer.memory.gpu_memory()``, ``trainer.service.metrics.gpu_memory_used()`` and NVML's raw
v1 and v2 figures; then again with 8 GiB allocated by this process, with the per-process
figures of ``bench.servers.gpu_memory()`` beside ``nvidia-smi --query-compute-apps``.
Exits 1 where a total differs by 1 MiB or more, or a used figure by 64 MiB or more.

    python3 bench/nvml_check.py
"""

from __future__ import annotations

import subprocess
import sys

MIB = 1 << 20


def smi(args: list[str]) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *args, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [[x.strip() for x in line.split(",")] for line in out.strip().splitlines()]


def compare(label: str) -> bool:
    import pynvml

    from trainer.memory import gpu_memory
    from trainer.service.metrics import gpu_memory_used

    ok = True
    gpus, used = gpu_memory(), gpu_memory_used(max_age_s=0)
    rows = smi(["--query-gpu=index,name,memory.total,memory.used,memory.reserved"])
    print(f"== {label}")
    pynvml.nvmlInit()
    for index, name, total, smi_used, reserved in rows:
        i = int(index)
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        v1 = pynvml.nvmlDeviceGetMemoryInfo(handle)
        v2 = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        gpu = gpus[i]
        print(
            f"gpu {i} {name}: nvidia-smi total {total} MiB, used {smi_used}, reserved {reserved}"
            f" | gpu_memory(): total {gpu.total / MIB:.1f} MiB, used {gpu.used / MIB:.1f}"
            f" | metrics gauge {used[i] / MIB:.1f}"
            f" | NVML v1 total {v1.total / MIB:.1f} used {v1.used / MIB:.1f}"
            f" | v2 total {v2.total / MIB:.1f} used {v2.used / MIB:.1f}"
            f" reserved {v2.reserved / MIB:.1f}"
        )
        total_ok = abs(gpu.total - int(total) * MIB) < MIB
        used_ok = abs(gpu.used - int(smi_used) * MIB) < 64 * MIB
        gauge_ok = abs(used[i] - int(smi_used) * MIB) < 64 * MIB
        print(f"  total matches: {total_ok}, used matches: {used_ok}, gauge matches: {gauge_ok}")
        ok = ok and total_ok and used_ok and gauge_ok
    pynvml.nvmlShutdown()
    return ok


def main() -> None:
    import torch

    from bench.servers import gpu_memory as by_process

    ok = compare("idle (no CUDA context in this process)")
    held = torch.empty(8 << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    ok = compare("8 GiB allocated by this process") and ok
    print("nvidia-smi --query-compute-apps:", smi(["--query-compute-apps=pid,used_memory"]))
    print("bench.servers.gpu_memory():", by_process())
    del held
    print("ALL MATCH" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
