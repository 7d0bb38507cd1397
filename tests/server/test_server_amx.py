"""vLLM-CPU's AMX kernels need the tile state granted by Linux; our plugin asks for it in
every vLLM process on the CPU platform, on purpose (``server/amx.py``), and nothing else
in the process has asked before it. Checked in fresh processes (the grant is per process).

The grant is observable only on a CPU with AMX tiles (Sapphire Rapids and later Xeons);
elsewhere both checks still run and assert that nothing is granted and nothing fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.server.conftest import ROOT

CHECK = textwrap.dedent(
    """
    import os, sys
    from server import amx
    has_amx = amx.supported()
    assert not amx.permitted(), "granted before anything asked: the check would prove nothing"
    os.environ["FINETUNE_DATA_DIR"] = sys.argv[1]
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        print("skip: vLLM runs on", current_platform.device_name)
        raise SystemExit(0)
    from server import resolver
    resolver.register()  # what vLLM runs in each of its processes
    assert amx.permitted() == has_amx, (amx.permitted(), has_amx)
    print("ok", has_amx)
    """
)


def test_the_plugin_grants_amx_in_each_vllm_process(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("skip"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.startswith("ok"), out.stdout


def test_enable_agrees_with_the_permission_it_reports() -> None:
    code = "from server import amx; ok = amx.enable(); assert ok == amx.permitted(); print(ok)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import torch

    assert out.stdout.strip() == str(bool(torch.cpu._is_amx_tile_supported()))
