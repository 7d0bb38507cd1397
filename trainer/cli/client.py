"""A small synchronous Python client for ``finetune.v1.Trainer``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from finetune.v1 import trainer_pb2 as pb
from finetune.v1 import trainer_pb2_grpc

CHUNK_BYTES = 1 << 20
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class TrainerClient:
    """One tenant's view of the service (or any tenant's, for an admin key with ``tenant``)."""

    def __init__(
        self, target: str, api_key: str, tenant: str | None = None, timeout: float = 60.0
    ) -> None:
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 4 << 20)]
        )
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)
        self.metadata: list[tuple[str, str]] = [("authorization", f"Bearer {api_key}")]
        if tenant:
            self.metadata.append(("x-tenant", tenant))
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=self.timeout)

    # ------------------------------------------------------------ datasets
    def upload_dataset(
        self, path: Path | str, name: str, on_progress: Callable[[int], None] | None = None
    ) -> pb.Dataset:
        """Stream a file in 1 MiB chunks; ``on_progress`` gets the bytes of each chunk sent."""
        path = Path(path)
        header = pb.UploadDatasetHeader(
            name=name, size_bytes=path.stat().st_size, sha256=file_sha256(path)
        )

        def messages() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(header=header)
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield pb.UploadDatasetRequest(chunk=chunk)
                    if on_progress:
                        on_progress(len(chunk))

        return self.stub.UploadDataset(messages(), metadata=self.metadata, timeout=None)

    def get_dataset(self, dataset_id: str) -> pb.Dataset:
        return self._call(self.stub.GetDataset, pb.GetDatasetRequest(id=dataset_id))

    def list_datasets(self) -> list[pb.Dataset]:
        return list(self._call(self.stub.ListDatasets, pb.ListDatasetsRequest()).datasets)

    def delete_dataset(self, dataset_id: str) -> None:
        self._call(self.stub.DeleteDataset, pb.DeleteDatasetRequest(id=dataset_id))

    def validate_dataset(
        self,
        dataset_id: str,
        base_model: str,
        *,
        validation_dataset_id: str | None = None,
        eval_fraction: float | None = None,
        **hyperparameters: Any,
    ) -> pb.DatasetReport:
        """What a job on this dataset and base would train; nothing is started or stored."""
        req = pb.ValidateDatasetRequest(
            dataset_id=dataset_id,
            base_model=base_model,
            hyperparameters=pb.Hyperparameters(**hyperparameters),
            validation_dataset_id=validation_dataset_id or "",
        )
        if eval_fraction is not None:
            req.eval_fraction = eval_fraction
        return self.stub.ValidateDataset(req, metadata=self.metadata, timeout=None)

    # ------------------------------------------------------------ jobs
    def create_job(
        self,
        base_model: str,
        dataset_id: str,
        adapter_name: str,
        *,
        validation_dataset_id: str | None = None,
        eval_fraction: float | None = None,
        **hyperparameters: Any,
    ) -> pb.Job:
        """Queue a job; keyword arguments are ``Hyperparameters`` fields (unset = default)."""
        req = pb.CreateJobRequest(
            base_model=base_model,
            dataset_id=dataset_id,
            adapter_name=adapter_name,
            hyperparameters=pb.Hyperparameters(**hyperparameters),
            validation_dataset_id=validation_dataset_id or "",
        )
        if eval_fraction is not None:
            req.eval_fraction = eval_fraction
        return self._call(self.stub.CreateJob, req)

    def get_job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id))

    def list_jobs(self) -> list[pb.Job]:
        return list(self._call(self.stub.ListJobs, pb.ListJobsRequest()).jobs)

    def cancel_job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(id=job_id))

    def watch_job(self, job_id: str) -> Iterator[pb.JobEvent]:
        """Every event of the job so far, then live ones until it ends."""
        yield from self.stub.WatchJob(
            pb.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=None
        )

    def job_events(self, job_id: str, settle_s: float = 3.0) -> list[pb.JobEvent]:
        """The job's events so far, without following it: all of them once it has ended;
        for a live job, the replay (events up to now), read for at most ``settle_s``."""
        job = self.get_job(job_id)
        if job.state in TERMINAL:
            return list(self.watch_job(job_id))
        now = time.time()
        out: list[pb.JobEvent] = []
        call = self.stub.WatchJob(
            pb.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=settle_s
        )
        try:
            for ev in call:
                out.append(ev)
                if ev.time.ToMicroseconds() / 1e6 >= now or ev.state in TERMINAL:
                    break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            call.cancel()
        return out

    def wait(self, job_id: str, timeout: float = 600.0) -> pb.Job:
        """Block until the job ends (or ``timeout`` passes) and return it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.state in TERMINAL or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    # ------------------------------------------------------------ adapters
    def list_adapters(self) -> list[pb.Adapter]:
        return list(self._call(self.stub.ListAdapters, pb.ListAdaptersRequest()).adapters)

    def delete_adapter(self, name: str) -> None:
        self._call(self.stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name))
