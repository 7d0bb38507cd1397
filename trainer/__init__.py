"""Per-customer QLoRA fine-tuning service.

Importing this package is cheap on purpose: the vLLM plugin and middleware in
``server/`` import ``trainer.names``, ``trainer.layout`` and ``trainer.tenants``
inside the vLLM process, which must not pull in torch or gRPC through here.
"""

__version__ = "0.1.0"
