"""What the container tests share: a Docker engine that answers, and what an image holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from constraints.gpu import norm, read_pins

ROOT = Path(__file__).resolve().parents[2]


def require_docker() -> None:
    """Skip without a Docker engine with Compose v2; fail instead where one is required
    (`make test-containers` and `make build-gpu` set FINETUNE_REQUIRE_DOCKER=1, as CI)."""
    ok = shutil.which("docker") is not None and all(
        subprocess.run(cmd, capture_output=True).returncode == 0
        for cmd in (["docker", "compose", "version"], ["docker", "info"])
    )
    if ok:
        return
    if os.environ.get("FINETUNE_REQUIRE_DOCKER") == "1":
        pytest.fail("no Docker engine with Compose v2 answers (`docker info`)")
    pytest.skip("no Docker engine with Compose v2 answers")


def run_in(image: str, *args: str) -> str:
    """``python ARGS`` in a throwaway container of ``image`` (no GPU needed)."""
    cmd = ["docker", "run", "--rm", "--entrypoint", "python", image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def installed(image: str) -> dict[str, str]:
    """{normalised name: version} of what pip sees in ``image``, less the base image's own
    tools (pip, setuptools, wheel: `pip freeze` leaves them out of the constraints too) and
    the project itself, built from this checkout."""
    listing = json.loads(run_in(image, "-m", "pip", "list", "--format", "json"))
    packages = {norm(p["name"]): p["version"] for p in listing}
    for name in ("pip", "setuptools", "wheel", "finetune-service"):
        packages.pop(name, None)
    return packages


def differences(image: str, constraints: Path) -> dict[str, tuple[str, str | None]]:
    """Packages of ``image`` at another version than ``constraints`` pins: (held, pinned)."""
    pins = read_pins(constraints)
    return {n: (v, pins.get(n)) for n, v in installed(image).items() if pins.get(n) != v}


def python_version(image: str) -> str:
    """``image``'s Python as ``str(sys.version_info[:2])``."""
    return run_in(image, "-c", "import sys; print(sys.version_info[:2])").strip()
