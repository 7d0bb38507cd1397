"""The ``finetune.v1.Trainer`` servicer: decode, call the domain, encode; nothing else.

Domain errors become status codes in one place (``_rpc``); a client's mistake
is never answered with INTERNAL.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from finetune.v1 import trainer_pb2 as pb
from finetune.v1 import trainer_pb2_grpc
from trainer import errors
from trainer.names import check_id, check_name
from trainer.service import convert
from trainer.service.archive import ArchiveDigest, members, tar_stream
from trainer.service.auth import Authenticator
from trainer.service.datasets import DatasetIngest
from trainer.service.jobs import Jobs
from trainer.service.pages import page
from trainer.service.publish import Publisher, check_version
from trainer.service.store import JobKind, JobState, Store
from trainer.service.usage import Quotas, UsageMeter

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    if isinstance(e, errors.DomainError):  # the first class it is (StorageFull: exhausted)
        await context.abort(next(c for cls, c in STATUS.items() if isinstance(e, cls)), str(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        # gRPC's code for "the entire file system is out of space" (the store raises
        # StorageFull, a ResourceExhausted, for its own); nothing was kept.
        log.error("out of disk space: %s", e)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "the service is out of disk space; try again later"
        )
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


def _rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map domain errors to status codes, for unary and server-streaming methods alike."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except Exception as e:
                await _abort(context, e)

        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as e:
            await _abort(context, e)

    return unary


async def _chunks(requests: AsyncIterator[pb.UploadDatasetRequest]) -> AsyncIterator[bytes]:
    async for req in requests:
        if req.WhichOneof("part") != "chunk":
            raise errors.InvalidArgument("header", "only the first message may carry a header")
        yield req.chunk


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(
        self,
        auth: Authenticator,
        store: Store,
        datasets: DatasetIngest,
        jobs: Jobs,
        publisher: Publisher,
        meter: UsageMeter,
        quotas: Quotas,
    ) -> None:
        self.auth = auth
        self.store = store
        self.datasets = datasets
        self.jobs = jobs
        self.publisher = publisher
        self.meter = meter
        self.quotas = quotas

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return self.auth.tenant(context.invocation_metadata())

    # ------------------------------------------------------------ datasets
    @_rpc
    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[pb.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.Dataset:
        tenant = self._tenant(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("header", "the first message must carry the header")
        h = first.header
        rec = await self.datasets.upload(
            tenant,
            h.name,
            _chunks(request_iterator),
            size_bytes=h.size_bytes if h.HasField("size_bytes") else None,
            sha256=h.sha256 if h.HasField("sha256") else None,
            request_id=h.request_id,
        )
        return convert.dataset(rec)

    @_rpc
    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.Dataset:
        tenant = self._tenant(context)
        return convert.dataset(self.datasets.get(tenant, check_id(request.id, "id")))

    @_rpc
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        tenant = self._tenant(context)
        recs, token = page(
            self.store.list_datasets(tenant),
            lambda r: [-r.created_at, r.id],
            request.page_size,
            request.page_token,
        )
        return pb.ListDatasetsResponse(
            datasets=[convert.dataset(r) for r in recs], next_page_token=token
        )

    @_rpc
    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        tenant = self._tenant(context)
        self.datasets.delete(tenant, check_id(request.id, "id"))
        return pb.DeleteDatasetResponse()

    @_rpc
    async def ValidateDataset(
        self, request: pb.ValidateDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DatasetReport:
        report = await self.jobs.validate(
            self._tenant(context),
            request.base_model,
            request.dataset_id,
            convert.job_config(request.hyperparameters),
            convert.eval_split(
                request.validation_dataset_id,
                request.eval_fraction if request.HasField("eval_fraction") else None,
            ),
        )
        return convert.dataset_report(report.to_dict()) or pb.DatasetReport()

    # ------------------------------------------------------------ jobs
    @_rpc
    async def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        tenant = self._tenant(context)
        rec = await self.jobs.create(
            tenant,
            request.base_model,
            request.dataset_id,
            request.adapter_name,
            convert.job_config(request.hyperparameters),
            convert.eval_split(
                request.validation_dataset_id,
                request.eval_fraction if request.HasField("eval_fraction") else None,
            ),
            request_id=request.request_id,
        )
        return convert.job(rec)

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return convert.job(self.jobs.get(self._tenant(context), request.id))

    @_rpc
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        states = convert.job_states(request.states)
        recs, token = page(
            self.jobs.list(self._tenant(context), states, request.adapter_name),
            lambda r: [-r.created_at, r.id],
            request.page_size,
            request.page_token,
            filters=[sorted(s.value for s in states), request.adapter_name],
        )
        return pb.ListJobsResponse(jobs=[convert.job(r) for r in recs], next_page_token=token)

    @_rpc
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        return convert.job(await self.jobs.cancel(self._tenant(context), request.id))

    @_rpc
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        async for ev in self.jobs.watch(self._tenant(context), request.id):
            yield convert.event(ev)

    # ------------------------------------------------------------ adapters
    @_rpc
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        views, token = page(
            self.publisher.views(self._tenant(context)),
            lambda v: [v.served.name],
            request.page_size,
            request.page_token,
        )
        return pb.ListAdaptersResponse(
            adapters=[convert.adapter(v) for v in views], next_page_token=token
        )

    @_rpc
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        tenant = self._tenant(context)
        await self.publisher.delete(tenant, check_name(request.name, "name"))
        return pb.DeleteAdapterResponse()

    @_rpc
    async def ListAdapterVersions(
        self, request: pb.ListAdapterVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdapterVersionsResponse:
        tenant = self._tenant(context)
        views, token = page(
            self.publisher.versions(tenant, check_name(request.name, "name")),
            lambda v: [-int(v.record.version[1:])],
            request.page_size,
            request.page_token,
            filters=request.name,
        )
        return pb.ListAdapterVersionsResponse(
            versions=[convert.adapter_version(v) for v in views], next_page_token=token
        )

    @_rpc
    async def SetServedVersion(
        self, request: pb.SetServedVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Adapter:
        tenant, name = self._tenant(context), check_name(request.name, "name")
        if not self.store.list_adapter_versions(tenant, name):
            raise errors.NotFound(f"adapter {name!r} not found")
        await self.publisher.set_served(tenant, name, request.version or None)
        view = next(v for v in self.publisher.views(tenant) if v.served.name == name)
        return convert.adapter(view)

    @_rpc
    async def DeleteAdapterVersion(
        self, request: pb.DeleteAdapterVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterVersionResponse:
        tenant, name = self._tenant(context), check_name(request.name, "name")
        if not self.store.list_adapter_versions(tenant, name):
            raise errors.NotFound(f"adapter {name!r} not found")
        await self.publisher.delete_version(tenant, name, request.version)
        return pb.DeleteAdapterVersionResponse()

    @_rpc
    async def Download(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadResponse]:
        tenant = self._tenant(context)
        match request.WhichOneof("target"):
            case "adapter":
                name, _, asked = request.adapter.partition("@")
                check_name(name, "adapter")
                adapters = self.publisher.adapters
                version = check_version(asked) if asked else adapters.current(tenant, name)
                folder = adapters.fetch(tenant, name, version) if version else None
                if folder is None:
                    raise errors.NotFound(f"adapter: {request.adapter!r} not found")
                title = f"{name}-{version}"
            case "export_job_id":
                job = self.jobs.get(tenant, check_id(request.export_job_id, "export_job_id"))
                folder = self.jobs.scheduler.layout.export_dir(tenant, job.id)
                if job.kind != JobKind.MERGE_EXPORT or job.state != JobState.SUCCEEDED:
                    raise errors.FailedPrecondition(
                        f"export_job_id: job {job.id} is not a SUCCEEDED merged export"
                    )
                if not folder.is_dir():
                    raise errors.NotFound(f"export_job_id: the export of {job.id} was deleted")
                title = f"{job.adapter_name}-{job.adapter_version}-merged"
            case _:
                raise errors.InvalidArgument("adapter", "name an adapter, or give an export_job_id")
        files = members(folder)
        yield pb.DownloadResponse(
            header=pb.DownloadHeader(name=title, format="tar", files=[f.name for f in files])
        )
        digest = ArchiveDigest()
        async for chunk in tar_stream(files, digest):
            yield pb.DownloadResponse(chunk=chunk)
        yield pb.DownloadResponse(
            trailer=pb.DownloadTrailer(size_bytes=digest.size_bytes, sha256=digest.sha256)
        )

    @_rpc
    async def ExportMergedModel(
        self, request: pb.ExportMergedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        tenant = self._tenant(context)
        return convert.job(await self.jobs.export(tenant, request.adapter, request.request_id))

    @_rpc
    async def DeleteExport(
        self, request: pb.DeleteExportRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteExportResponse:
        tenant = self._tenant(context)
        await self.jobs.delete_export(tenant, check_id(request.job_id, "job_id"))
        return pb.DeleteExportResponse()

    # ------------------------------------------------------------ usage
    @_rpc
    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Usage:
        tenant = self._tenant(context)
        return convert.usage(self.meter.usage(tenant), self.quotas)
