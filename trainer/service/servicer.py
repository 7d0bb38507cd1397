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
from trainer.service.auth import Authenticator
from trainer.service.datasets import DatasetIngest
from trainer.service.jobs import Jobs
from trainer.service.publish import Publisher
from trainer.service.store import Store

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
    ) -> None:
        self.auth = auth
        self.store = store
        self.datasets = datasets
        self.jobs = jobs
        self.publisher = publisher

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
        recs = self.store.list_datasets(tenant)
        return pb.ListDatasetsResponse(datasets=[convert.dataset(r) for r in recs])

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
        )
        return convert.job(rec)

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return convert.job(self.jobs.get(self._tenant(context), request.id))

    @_rpc
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        recs = self.jobs.list(self._tenant(context))
        return pb.ListJobsResponse(jobs=[convert.job(r) for r in recs])

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
        recs = self.store.list_adapters(self._tenant(context))
        return pb.ListAdaptersResponse(adapters=[convert.adapter(r) for r in recs])

    @_rpc
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        tenant = self._tenant(context)
        await self.publisher.delete(tenant, check_name(request.name, "name"))
        return pb.DeleteAdapterResponse()
