"""Adapter cold-load latency: object storage (S3) against the local volume (issue 23's figure).

One adapter of ``--mb`` MiB (``adapter_model.safetensors`` of random bytes, a config and a
2 MiB tokenizer) is published into each store. Each run then does what the resolver plugin
does on a request naming an adapter vLLM has not loaded: ``current`` and ``fetch`` (for
S3, into an empty cache: a cold load), then reads every byte of the folder, as vLLM's
loader will. A warm S3 run (the version already cached) is measured too. The S3 server is
a throwaway Ceph radosgw on loopback (``tests/radosgw.py``: memstore, in RAM) unless
``--endpoint`` names one (keys from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``).

    .venv/bin/python -m bench.adapter_fetch --mb 50 --runs 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from trainer.adapter_store import AdapterStore, LocalAdapterStore
from trainer.bucket import Bucket
from trainer.layout import Layout
from trainer.object_store import S3AdapterStore


def _adapter(folder: Path, mib: int) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": "bench", "r": 64}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(mib << 20))
    (folder / "tokenizer.json").write_bytes(os.urandom(2 << 20))
    return folder


def _load(store: AdapterStore) -> float:
    """Seconds from the name to every byte read, as the plugin and vLLM do it."""
    start = time.perf_counter()
    version = store.current("bench", "adapter")
    assert version is not None
    folder = store.fetch("bench", "adapter", version)
    assert folder is not None
    for path in folder.iterdir():
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
    return time.perf_counter() - start


@contextlib.contextmanager
def _s3(endpoint: str | None) -> Iterator[Callable[[Path], S3AdapterStore]]:
    if endpoint:
        bucket, access, secret = os.environ.get("BENCH_BUCKET", "bench"), None, None
        gateway = None
    else:
        from tests.radosgw import running_gateway

        gateway_cm = running_gateway()
        gateway = gateway_cm.__enter__()
        made = gateway.create_bucket()
        endpoint, bucket = made.endpoint, made.bucket
        access, secret = made.access_key, made.secret_key
    prefix = f"bench-{secrets.token_hex(4)}"
    try:
        s3 = Bucket(
            bucket, prefix=prefix, endpoint_url=endpoint, access_key=access, secret_key=secret
        )
        yield lambda cache: S3AdapterStore(s3, cache_dir=cache)
    finally:
        if gateway is not None:
            gateway_cm.__exit__(None, None, None)


def _ms(values: list[float]) -> str:
    mid, low, high = (x * 1000 for x in (statistics.median(values), min(values), max(values)))
    return f"median {mid:7.1f} ms  (min {low:.1f}, max {high:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="Adapter weights in MiB.")
    parser.add_argument("--runs", type=int, default=7, help="Loads measured per case.")
    parser.add_argument("--endpoint", default=None, help="An S3 endpoint (default: radosgw).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp_name, _s3(args.endpoint) as s3:
        tmp = Path(tmp_name)
        src = _adapter(tmp / "src", args.mb)
        size = sum(p.stat().st_size for p in src.iterdir())
        local = LocalAdapterStore(Layout(tmp / "data").create())
        local.publish("bench", "adapter", src, {"job_id": "bench"})
        publisher = s3(tmp / "unused")
        start = time.perf_counter()
        publisher.publish("bench", "adapter", src, {"job_id": "bench"})
        publish_s = time.perf_counter() - start

        cold = []
        for i in range(args.runs):  # a new cache each time: as a replica that never saw it
            reader = s3(tmp / f"cache-{i}")
            cold.append(_load(reader))
        warm = [_load(reader) for _ in range(args.runs)]
        volume = [_load(local) for _ in range(args.runs)]

    print(f"adapter: {size / 2**20:.1f} MiB in 3 files; S3 publish {publish_s * 1000:.0f} ms")
    print(f"local volume (page cache)   {_ms(volume)}")
    rate = size / 2**20 / statistics.median(cold)
    print(f"S3 cold (empty cache)       {_ms(cold)}  {rate:.0f} MiB/s")
    print(f"S3 warm (cached version)    {_ms(warm)}")


if __name__ == "__main__":
    main()
