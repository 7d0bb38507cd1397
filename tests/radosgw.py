"""A throwaway S3 server for tests: Ceph's RADOS Gateway, and its pytest fixtures.

``RadosGateway`` follows the recipe in ``shared/scale/FACTS.md`` section 4: one monitor, one
OSD on ``memstore`` (objects in memory, 1 GiB), and ``radosgw`` with its beast frontend, all
on free loopback ports with every file in one temporary folder; authentication is off inside
the cluster (so the gateway needs ``crc`` messenger modes) and on for S3 (a user with known
keys). The daemons fork into the background: they are stopped by the pids in their pid
files, never by name.

Fixtures (modules use them with ``pytest_plugins = ("tests.radosgw",)``): ``radosgw``, one
gateway for the session, and ``s3_bucket``, a fresh bucket on it for each test. Without
Ceph's binaries (``apt-get install ceph-mon ceph-osd radosgw ceph-common``) they skip,
unless ``FINETUNE_REQUIRE_S3=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from trainer.bucket import Bucket
    from trainer.object_store import S3AdapterStore

TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph-authtool", "ceph")
ACCESS_KEY = "FINETUNETESTKEY"
SECRET_KEY = "finetune-test-secret"
# With cluster auth off, the gateway loops on "get_initial_auth_request returned -13"
# unless every messenger mode is crc (FACTS.md section 4).
_CRC = [
    f"--{opt}=crc"
    for opt in (
        "ms_mon_client_mode",
        "ms_client_mode",
        "ms_mon_cluster_mode",
        "ms_cluster_mode",
        "ms_service_mode",
        "ms_mon_service_mode",
    )
]


def require_tools() -> None:
    """Ceph's binaries, or a skip saying how to get them (a failure where CI requires them)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    why = (
        f"Ceph's radosgw is not installed (missing {', '.join(missing)}; `apt-get install "
        "--no-install-recommends ceph-mon ceph-osd radosgw ceph-common`)"
    )
    if os.environ.get("FINETUNE_REQUIRE_S3") == "1":
        pytest.fail(f"FINETUNE_REQUIRE_S3=1 but {why}", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is gone, waiting for init to reap it


@dataclass(frozen=True)
class S3Bucket:
    """Where a test's objects go, and how to reach them."""

    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to reach this bucket's server."""
        return {
            "FINETUNE_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def s3(self, **kwargs: Any) -> Bucket:
        """This bucket as the stores reach it (``kwargs``: ``prefix`` and the like)."""
        from trainer.bucket import Bucket

        return Bucket(
            self.bucket,
            endpoint_url=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            **kwargs,
        )

    def store(self, cache_dir: Path, **kwargs: Any) -> S3AdapterStore:
        """An ``S3AdapterStore`` on this bucket (``kwargs``: ``prefix`` and the like)."""
        from trainer.object_store import S3AdapterStore

        return S3AdapterStore(self.s3(**kwargs), cache_dir=cache_dir)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


class RadosGateway:
    """One monitor, one memstore OSD and one radosgw in a temporary folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="finetune-rgw-"))
        self.conf = self.root / "ceph.conf"
        self.port = _free_port()
        self.osd_id = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run(
                [args[0], "-c", str(self.conf), *args[1:]],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.root,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{' '.join(args)} hung:\n{self._logs()}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr}\n{self._logs()}")
        return done.stdout

    def _logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
            for log in sorted((self.root / "log").glob("*.log"))
        )

    def start(self) -> None:
        for sub in ("mon", "osd", "run", "log", "rgw"):
            (self.root / sub).mkdir()
        fsid = str(uuid.uuid4())
        mon_host = f"[v2:127.0.0.1:{_free_port()},v1:127.0.0.1:{_free_port()}]"
        d = self.root
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = {mon_host}
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# Commit map changes at once (default: wait 1 s to batch them): rgw creates 6 pools.
paxos propose interval = 0.01
paxos min wait = 0.01
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 1073741824
ms bind ipv6 = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
[client]
rgw frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw data = {d}/rgw
"""
        )
        monmap, keyring = str(d / "monmap"), str(d / "mon.keyring")
        subprocess.run(["monmaptool", "--create", "--addv", "a", mon_host, "--fsid", fsid,
                        monmap], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                        "--cap", "mon", "allow *"], check=True, capture_output=True)  # fmt: skip
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        self._run("ceph-mon", "-i", "a")
        self.osd_id = self._run("ceph", "osd", "create").strip()
        (d / "osd" / f"ceph-{self.osd_id}").mkdir()
        self._run("ceph-osd", "-i", self.osd_id, "--mkfs")
        self._run("ceph-osd", "-i", self.osd_id)
        self.start_gateway()
        self._run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                  f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")  # fmt: skip

    def start_gateway(self, timeout: float = 60) -> None:
        """Start radosgw (again) on its port; return once it answers HTTP."""
        self._run("radosgw", "-n", "client.admin", *_CRC)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # an S3 error document: it answers
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"radosgw did not answer on {self.endpoint}:\n{self._logs()}")

    def _pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "run" / f"{name}.pid").read_text().strip())
        return None

    def _stop(self, name: str, timeout: float = 20) -> None:
        pid = self._pid(name)
        if pid is None or not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_gateway(self) -> None:
        """Stop radosgw only (the cluster keeps the objects): S3 is down."""
        self._stop("client.admin")
        (self.root / "run" / "client.admin.pid").unlink(missing_ok=True)

    def cleanup(self) -> None:
        for name in ("client.admin", f"osd.{self.osd_id}", "mon.a"):
            self._stop(name)
        shutil.rmtree(self.root, ignore_errors=True)

    def create_bucket(self) -> S3Bucket:
        bucket = S3Bucket(self.endpoint, f"test-{secrets.token_hex(6)}")
        bucket.client().create_bucket(Bucket=bucket.bucket)
        return bucket


@contextlib.contextmanager
def running_gateway() -> Iterator[RadosGateway]:
    """A started gateway of its own (skipped or failed as ``require_tools`` says)."""
    require_tools()
    gateway = RadosGateway()
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.cleanup()


@pytest.fixture(scope="session")
def radosgw() -> Iterator[RadosGateway]:
    """One gateway for the whole session."""
    with running_gateway() as gateway:
        yield gateway


@pytest.fixture
def s3_bucket(radosgw: RadosGateway) -> S3Bucket:
    """A fresh, empty bucket on the session's gateway."""
    return radosgw.create_bucket()
