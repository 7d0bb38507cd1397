"""The vLLM processes of the serving benchmark (``bench/serving_gpu.py``): the product as
the compose file starts it, vLLM alone, and what they report (start time, memory, LoRA
loading latency).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from trainer.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE = "base"
TENANT = "bench"
ADAPTERS = 32
START = time.monotonic()


def log(*parts: object) -> None:
    print(f"[{time.monotonic() - START:6.0f}s]", *parts, flush=True)


class Server:
    """A vLLM process (the product's launcher or vLLM alone) with its log and timings."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], out: Path) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"vllm-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.started = self.healthy_s = 0.0

    def start(self) -> Server:
        log(f"start {self.name}: {' '.join(self.cmd)}")
        self.started = time.monotonic()
        with open(self.log_path, "ab") as f:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def logged(self, text: str) -> bool:
        return text in self.log_path.read_text(errors="replace")

    def wait(self, pred, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode} ({what})")
            if pred():
                return
            time.sleep(0.5)
        raise SystemExit(f"{self.name}: {what} not seen in {timeout:.0f}s")

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait(up, "healthy", timeout)
        if not self.healthy_s:
            self.healthy_s = time.monotonic() - self.started
            log(f"{self.name} healthy after {self.healthy_s:.1f}s")
        return self.healthy_s

    def stop(self) -> None:
        from trainer.processes import stop

        if self.proc is not None:
            stop(self.proc, group=True)
            self.proc = None


def base_env(smoke: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if smoke:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def product_cmd(model: Path, data: Path, engine: list[str], max_loras: int = 8) -> list[str]:
    """The compose file's vllm service command (``python -m server`` is its ENTRYPOINT)."""
    return [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(model),
        "--served-model-name",
        BASE,
        "--data-dir",
        str(data),
        "--port",
        str(free_port()),
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(ADAPTERS),
        "--max-lora-rank",
        "64",
        "--",
        *engine,
    ]


def alone_cmd(model: Path, engine: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        BASE,
        "--port",
        str(free_port()),
        "--enable-lora",
        "--max-loras",
        "8",
        "--max-cpu-loras",
        str(ADAPTERS),
        "--max-lora-rank",
        "64",
        *engine,
    ]


def load_adapters(server: Server, key: str, folders: list[Path]) -> dict[str, Any]:
    """``POST /v1/load_lora_adapter`` for each adapter in turn; the latencies."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=300) as c:
        for i, folder in enumerate(folders):
            t = time.perf_counter()
            r = c.post(
                "/v1/load_lora_adapter",
                json={"lora_name": f"{TENANT}/a{i}", "lora_path": str(folder)},
            )
            assert r.status_code == 200, (server.name, r.status_code, r.text[:500])
            times.append(time.perf_counter() - t)
    return {
        "adapters": len(times),
        "first_ms": round(times[0] * 1e3, 1),
        "p50_ms": round(loadgen.pct(times, 0.5) * 1e3, 1),  # type: ignore[operator]
        "max_ms": round(max(times) * 1e3, 1),
    }


def gpu_memory() -> list[dict[str, Any]]:
    """GPU memory by process, as NVML (what nvidia-smi reads) reports it; one error row
    where it cannot."""
    rows: list[dict[str, Any]] = []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # nvidia-ml-py missing, or no driver
        return [{"error": repr(e)}]
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                try:
                    raw = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                    cmd = raw.replace(b"\0", b" ").decode()[:120]
                except OSError:  # another PID namespace
                    cmd = "?"
                used = proc.usedGpuMemory  # None where the driver does not say
                gib = round(used / 2**30, 2) if used is not None else None
                rows.append({"gpu": index, "pid": proc.pid, "used_gib": gib, "cmd": cmd})
    except pynvml.NVMLError as e:
        rows.append({"error": repr(e)})
    finally:
        pynvml.nvmlShutdown()
    return rows


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {}
    for name in ("vllm", "torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "?"
    return found


# name: (environment, vLLM flags, --max-loras); joined with "+" on the command line.
def loaded_memory(server: Server) -> dict[str, str]:
    """What vLLM logged about its memory: weights, KV cache, CUDA graphs."""
    found = {}
    for line in server.log_path.read_text(errors="replace").splitlines():
        for key, needle in (
            ("weights", "Model loading took"),
            ("kv_cache", "KV cache memory"),
            ("kv_tokens", "GPU KV cache size"),
            ("graphs", "Graph capturing"),
        ):
            if needle in line:
                found[key] = line.split(needle, 1)[1].strip()[:160]
    return found
