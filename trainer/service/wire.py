"""Requests whose bytes are not a valid protobuf message: a client's mistake, answered as one.

grpc decodes a request before the servicer runs; left alone, a corrupt message is
answered UNKNOWN (unary calls) or INTERNAL (a corrupt chunk in the upload stream), and
before the API key is looked at. ``DecodeGuard`` wraps every handler's deserializer so
an undecodable message reaches the method as a marker: the key is checked first (no
key: UNAUTHENTICATED, as for any request), then the call is refused INVALID_ARGUMENT.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from trainer import errors

Metadata = Iterable[tuple[str, str | bytes]] | None


class Undecodable:
    """Stands in for a message that did not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def WhichOneof(self, group: str) -> None:
        """An interceptor outside this one that peeks at a message sees an empty one."""
        return None


def _method(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1] if details.method else "?"


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answer undecodable requests INVALID_ARGUMENT, after the same key check as any call."""

    def __init__(
        self,
        authenticate: Callable[[Metadata], object],
        status: dict[type[errors.DomainError], grpc.StatusCode],
    ) -> None:
        self.authenticate = authenticate
        self.status = status

    async def _refuse(self, context: grpc.aio.ServicerContext, what: str) -> None:
        try:
            self.authenticate(context.invocation_metadata())
        except errors.DomainError as e:
            await context.abort(self.status[type(e)], str(e))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, what)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        what = f"request: not a valid {_method(handler_call_details)} message"

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # DecodeError, or whatever a parser raises on hostile bytes
                return Undecodable(str(e))

        guard = self
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await guard._refuse(context, what)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream
            if not inspect.isasyncgenfunction(inner_us):  # streams with context.write

                async def unary_stream_writer(
                    request: Any, context: grpc.aio.ServicerContext
                ) -> Any:
                    if isinstance(request, Undecodable):
                        await guard._refuse(context, what)
                    await inner_us(request, context)

                return handler._replace(
                    request_deserializer=tolerant, unary_stream=unary_stream_writer
                )

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await guard._refuse(context, what)
                async for item in inner_us(request, context):
                    yield item

            return handler._replace(request_deserializer=tolerant, unary_stream=unary_stream)

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            # The servicer checks the key before it reads the stream; a domain error
            # raised here is mapped by it like any other.
            n = 0
            async for req in requests:
                n += 1
                if isinstance(req, Undecodable):
                    raise errors.InvalidArgument("request", f"message {n} is not valid protobuf")
                yield req

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await inner_su(checked(requests), context)

            return handler._replace(request_deserializer=tolerant, stream_unary=stream_unary)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for item in inner_ss(checked(requests), context):
                yield item

        return handler._replace(request_deserializer=tolerant, stream_stream=stream_stream)
