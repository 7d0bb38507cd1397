"""The service's logs: plain text for people, or one JSON object a line for machines.

``python -m trainer serve --log-format json`` (env FINETUNE_LOG_FORMAT). Fields given
with ``extra=`` (``job_id``, ``tenant``, ``state`` on every job transition) become keys
of the JSON object; in text they follow the message as ``key=value``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

from trainer.config import LOG_FORMATS as FORMATS

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(_LibraryJsonFormatter):
    """python-json-logger's, with the keys this service has always written: ``time`` (UTC,
    milliseconds, ``Z``), ``level``, ``logger``, ``message``, the extras, ``exception``."""

    converter = staticmethod(time.gmtime)  # UTC, as the "Z" says
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"
            },
            json_default=str,
        )  # fmt: skip


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _extra(record)
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return text


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once (stderr)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {FORMATS}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
