"""A small synchronous Python client for ``finetune.v1.Trainer``."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
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

    def _all(self, method: Callable[..., Any], request: Any, field: str) -> list[Any]:
        """Every item of a paged list call, page after page."""
        items: list[Any] = []
        while True:
            response = self._call(method, request)
            items.extend(getattr(response, field))
            if not response.next_page_token:
                return items
            request.page_token = response.next_page_token

    # ------------------------------------------------------------ datasets
    def upload_dataset(
        self,
        path: Path | str,
        name: str,
        on_progress: Callable[[int], None] | None = None,
        request_id: str = "",
    ) -> pb.Dataset:
        """Stream a file in 1 MiB chunks; ``on_progress`` gets the bytes of each chunk sent.
        A retry with the same ``request_id`` returns the first upload's dataset."""
        path = Path(path)
        header = pb.UploadDatasetHeader(
            name=name,
            size_bytes=path.stat().st_size,
            sha256=file_sha256(path),
            request_id=request_id,
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
        return self._all(self.stub.ListDatasets, pb.ListDatasetsRequest(), "datasets")

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
        request_id: str = "",
        **hyperparameters: Any,
    ) -> pb.Job:
        """Queue a job; keyword arguments are ``Hyperparameters`` fields (unset = default).
        A retry with the same ``request_id`` returns the first call's job."""
        req = pb.CreateJobRequest(
            base_model=base_model,
            dataset_id=dataset_id,
            adapter_name=adapter_name,
            hyperparameters=pb.Hyperparameters(**hyperparameters),
            validation_dataset_id=validation_dataset_id or "",
            request_id=request_id,
        )
        if eval_fraction is not None:
            req.eval_fraction = eval_fraction
        return self._call(self.stub.CreateJob, req)

    def get_job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id))

    def list_jobs(
        self, states: list[pb.JobState] | None = None, adapter_name: str = ""
    ) -> list[pb.Job]:
        """Every job, newest first; filtered by states (``pb.JOB_STATE_*``) and adapter."""
        req = pb.ListJobsRequest(states=states or [], adapter_name=adapter_name)
        return self._all(self.stub.ListJobs, req, "jobs")

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
        return self._all(self.stub.ListAdapters, pb.ListAdaptersRequest(), "adapters")

    def delete_adapter(self, name: str) -> None:
        self._call(self.stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name))

    def list_versions(self, name: str) -> list[pb.AdapterVersion]:
        req = pb.ListAdapterVersionsRequest(name=name)
        return self._all(self.stub.ListAdapterVersions, req, "versions")

    def set_served_version(self, name: str, version: str = "") -> pb.Adapter:
        """Pin ``version`` (a rollback), or follow the newest again with ""."""
        req = pb.SetServedVersionRequest(name=name, version=version)
        return self._call(self.stub.SetServedVersion, req)

    def delete_version(self, name: str, version: str) -> None:
        req = pb.DeleteAdapterVersionRequest(name=name, version=version)
        self._call(self.stub.DeleteAdapterVersion, req)

    def export_merged(self, adapter: str, request_id: str = "") -> pb.Job:
        """Queue a merged export of ``NAME`` or ``NAME@vNNNN``."""
        req = pb.ExportMergedModelRequest(adapter=adapter, request_id=request_id)
        return self._call(self.stub.ExportMergedModel, req)

    def delete_export(self, job_id: str) -> None:
        self._call(self.stub.DeleteExport, pb.DeleteExportRequest(job_id=job_id))

    def usage(self) -> pb.Usage:
        return self._call(self.stub.GetUsage, pb.GetUsageRequest())

    def download(self, out_dir: Path | str, *, adapter: str = "", export_job_id: str = "") -> Path:
        """Download an adapter version (``NAME`` or ``NAME@vNNNN``) or a merged export into
        ``out_dir`` (created; it must not exist or be empty). The archive is checked against
        the sha256 the server sends before anything is unpacked."""
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not an empty folder")
        req = (
            pb.DownloadRequest(adapter=adapter)
            if adapter
            else pb.DownloadRequest(export_job_id=export_job_id)
        )
        parent = out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        trailer: pb.DownloadTrailer | None = None
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".download-", suffix=".tar") as tmp:
            for msg in self.stub.Download(req, metadata=self.metadata, timeout=None):
                match msg.WhichOneof("part"):
                    case "chunk":
                        h.update(msg.chunk)
                        tmp.write(msg.chunk)
                    case "trailer":
                        trailer = msg.trailer
            tmp.flush()
            if trailer is None or trailer.sha256 != h.hexdigest():
                raise OSError("the download was cut short or corrupted (sha256 differs)")
            if trailer.size_bytes != os.fstat(tmp.fileno()).st_size:
                raise OSError("the download's size differs from the server's")
            stage = Path(tempfile.mkdtemp(dir=parent, prefix=".download-"))
            with tarfile.open(tmp.name) as tar:
                tar.extractall(stage, filter="data")
            if out.exists():
                out.rmdir()
            stage.rename(out)
        return out
