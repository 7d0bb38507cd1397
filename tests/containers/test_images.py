"""The GPU images `make build-gpu` built hold exactly constraints/gpu.txt (no GPU needed:
only pip runs in them). The CPU images are checked against constraints/cpu.txt by
test_compose.py, which builds them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.containers.images import ROOT, differences, python_version, require_docker

pytestmark = pytest.mark.gpu_images

GPU_IMAGES = ("finetune-service/trainer:gpu", "finetune-service/server:gpu")


@pytest.mark.parametrize("image", GPU_IMAGES)
def test_the_gpu_images_hold_exactly_their_constraints(image: str) -> None:
    require_docker()
    probe = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    assert probe.returncode == 0, f"{image} is not built: `make build-gpu` builds it"
    held = differences(image, ROOT / "constraints" / "gpu.txt")
    assert not held, f"{image}: installed vs constraints/gpu.txt: {held}"
    assert python_version(image) == str(sys.version_info[:2])
