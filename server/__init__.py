"""Serving: vLLM's OpenAI server, extended only through vLLM's own plug points.

* ``server.launcher`` (``python -m server``) builds the vLLM command line and environment;
* ``server.resolver`` is a ``vllm.general_plugins`` entry point that registers a LoRA
  resolver serving ``<tenant>/<adapter>`` from the shared volume;
* ``server.middleware.TenantMiddleware`` is passed with ``--middleware``: tenant API keys,
  deny-by-default routes, per-tenant ``model`` checks and ``/v1/models`` filtering.

The plugin and the middleware run inside vLLM's processes and learn their settings from
the environment the launcher sets (names below). This package stays free of heavy imports:
vLLM imports the plugin in every one of its processes.
"""

from __future__ import annotations

ENV_DATA_DIR = "FINETUNE_DATA_DIR"
"""The shared volume (``DATA``); the resolver registers itself only when it is set."""

ENV_TENANTS_FILE = "FINETUNE_TENANTS_FILE"
"""Tenants and key hashes (default ``DATA/tenants.json``), read by the middleware."""

ENV_TENANTS_STORE = "FINETUNE_TENANTS_STORE"
"""Tenants in object storage (``s3://BUCKET/PREFIX``) in place of the file, for hosts
that share no volume; the trainer's ``--tenants-store``."""

ENV_BASE_MODEL = "FINETUNE_BASE_MODEL"
"""The base model's served name (``--served-model-name``)."""

ENV_MODEL_PATH = "FINETUNE_MODEL_PATH"
"""The base model as given to ``--model`` (a path or hub id)."""
