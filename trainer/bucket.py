"""One S3 bucket under a key prefix: the calls the object stores make, and their errors.

``trainer.object_store`` (adapter versions) and ``trainer.job_files`` (datasets and
checkpoints) both keep their objects through a ``Bucket``. A missing key is ``None``, a
create-only write that finds the key there is ``Taken``, and storage that does not do what
was asked is ``Unavailable``, naming the endpoint, the operation and the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainer.errors import InvalidArgument, Unavailable

ENV_ENDPOINT = ("FINETUNE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_MISSING = ("404", "NoSuchKey", "NotFound")  # HEAD answers the bare status
_TAKEN = ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")
_CHUNK = 1 << 20


class Taken(Exception):
    """A create-only write found the key already there."""


class Bucket:
    """``s3://<bucket>/<prefix>`` through boto3, path-style (radosgw, MinIO and AWS alike)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        attempts: int = 3,
    ) -> None:
        import boto3  # here: the vLLM plugin imports the stores, boto3 only when used
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint_url or "the default AWS endpoint"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},  # radosgw and most S3 servers off AWS
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
                # Checksum trailers (boto3 >= 1.36) are not understood by every S3 server.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    @classmethod
    def from_url(cls, url: str, setting: str) -> Bucket:
        """``s3://bucket/prefix``, with the endpoint from ``FINETUNE_S3_ENDPOINT_URL`` or
        ``AWS_ENDPOINT_URL`` (AWS itself when neither is set) and the usual AWS credentials;
        anything else is refused naming ``setting``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidArgument(setting, f"{url!r} is neither empty nor s3://bucket/prefix")
        endpoint = next((os.environ[e] for e in ENV_ENDPOINT if os.environ.get(e)), None)
        return cls(parsed.netloc, prefix=parsed.path, endpoint_url=endpoint)

    def call(self, operation: str, key: str, **kwargs: Any) -> Any:
        """One S3 call; None for a missing key, ``Taken`` for a refused create-only write,
        ``Unavailable`` for anything else the storage did not do."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING:  # a missing bucket is not a missing key: NoSuchBucket
                return None
            if code in _TAKEN or status in _TAKEN:
                raise Taken(key) from None
            raise Unavailable(
                f"object storage at {self.endpoint} refused {operation} of "
                f"s3://{self.bucket}/{key}: {code or status} {err.get('Message') or ''}".strip()
            ) from e
        except BotoCoreError as e:
            raise Unavailable(
                f"object storage at {self.endpoint} did not answer {operation} of "
                f"s3://{self.bucket}/{key}: {e}"
            ) from e

    def get(self, key: str) -> bytes | None:
        found = self.call("get_object", key, Key=key)
        if found is None:
            return None
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(found["Body"].read())
        except (BotoCoreError, OSError) as e:
            raise Unavailable(f"object storage at {self.endpoint}: reading {key}: {e}") from e

    def put(self, key: str, body: Any, *, create: bool = False, **extra: Any) -> None:
        if create:
            extra["IfNoneMatch"] = "*"
        self.call("put_object", key, Key=key, Body=body, **extra)

    def objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (key and size)."""
        token: dict[str, str] = {}
        while True:
            page = self.call("list_objects_v2", prefix, Prefix=prefix, **token) or {}
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            done = self.call("delete_objects", keys[i], Delete={"Objects": batch, "Quiet": True})
            if failed := (done or {}).get("Errors"):  # a batch answers per key
                first = failed[0]
                raise Unavailable(
                    f"object storage at {self.endpoint} kept {len(failed)} of the objects to "
                    f"delete, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def download(self, key: str, dest: Path, size: int) -> None:
        """``key`` into the file ``dest``; ``Unavailable`` unless all ``size`` bytes came."""
        found = self.call("get_object", key, Key=key)
        if found is None:
            raise Unavailable(f"{key} vanished while being fetched")
        from botocore.exceptions import BotoCoreError

        written = 0
        try:
            with open(dest, "wb") as f:
                for chunk in found["Body"].iter_chunks(_CHUNK):
                    f.write(chunk)
                    written += len(chunk)
        except BotoCoreError as e:
            raise Unavailable(f"object storage at {self.endpoint}: reading {key}: {e}") from e
        if written != size:
            raise Unavailable(f"{key}: got {written} bytes of {size}")
