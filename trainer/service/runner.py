"""Where a job's work runs: its training, and the validation of a dataset for it.

``JobRunner`` is the seam: the scheduler and ``Jobs`` start runs through it and read
their ``trainer.events`` back, by type. ``LocalRunner``, the one implementation today,
starts subprocesses on this host: ``python -m trainer.training.worker SPEC`` (in a session of its
own, so that a cancel or a crash ends the whole group and frees its memory, on the GPU
the scheduler gives it), ``python -m trainer.training.export SPEC`` (a merged export, the
same way) and ``python -m trainer.data.report SPEC`` (for ``ValidateDataset``).
Both die with the service (``trainer.processes.die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Protocol

from trainer.events import Event, decode

# Longest event line read: a dataset report with its findings fits many times over.
MAX_EVENT_BYTES = 16 << 20


class Run:
    """One run of a job's subprocess: its events as they come, then its exit status."""

    def __init__(self, process: asyncio.subprocess.Process, own_group: bool) -> None:
        self.process = process
        self.own_group = own_group  # a session (process group) of its own

    @property
    def pid(self) -> int:
        return self.process.pid

    async def events(self) -> AsyncIterator[Event]:
        """Each event until the stream ends (lines that are not events are skipped)."""
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            if (event := decode(line)) is not None:
                yield event

    async def wait(self) -> int:
        """The exit status; negative: the signal that ended it."""
        return await self.process.wait()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the run's process group (its children too), if it has one of its
        own, else to the process; a run already gone is left alone."""
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.pid, sig)
            elif self.process.returncode is None:
                self.process.send_signal(sig)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (and for any child left in the group)."""
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.wait()
        if self.own_group:  # children that outlived the leader
            self.signal(signal.SIGKILL)


class JobRunner(Protocol):
    """Starts a job's runs."""

    async def train(self, spec_file: Path, log: Path, gpu: int | None) -> Run:
        """Train as ``spec_file`` says, on ``gpu`` (None: the CPU); library output to ``log``."""
        ...

    async def validate(self, spec_file: Path, packing: bool, log: Path) -> Run:
        """The dataset report of the job ``spec_file`` describes; library output to ``log``."""
        ...

    async def export(self, spec_file: Path, log: Path, gpu: int | None) -> Run:
        """Merge the adapter version ``spec_file`` names into its base, on ``gpu``."""
        ...


class LocalRunner:
    """Runs on this host, as subprocesses of the service."""

    async def train(self, spec_file: Path, log: Path, gpu: int | None) -> Run:
        return await self._on_device("trainer.training.worker", spec_file, log, gpu)

    async def export(self, spec_file: Path, log: Path, gpu: int | None) -> Run:
        return await self._on_device("trainer.training.export", spec_file, log, gpu)

    async def _on_device(self, module: str, spec_file: Path, log: Path, gpu: int | None) -> Run:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log, "ab") as stderr:
            return await self._start([module, str(spec_file)], stderr, env, True)

    async def validate(self, spec_file: Path, packing: bool, log: Path) -> Run:
        args = ["trainer.data.report", str(spec_file), *(["--packing"] if packing else [])]
        with open(log, "ab") as stderr:
            return await self._start(args, stderr, None, False)

    @staticmethod
    async def _start(
        args: list[str], stderr: IO[bytes], env: dict[str, str] | None, own_session: bool
    ) -> Run:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=own_session,
            limit=MAX_EVENT_BYTES,
        )
        return Run(process, own_session)
