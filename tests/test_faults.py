"""Faults with real processes and real signals: the trainer killed with SIGKILL during an
upload and during publishing, training subprocesses that die (a real out-of-memory kill
in a memory cgroup, SIGSEGV, an exception), and a full disk under the adapters volume.

After each: nothing half-stored, the job resumed or failed with a reason, the next
queued job runs, and the previously published version is intact and is what the
resolver (vLLM's lookup of ``<tenant>/<adapter>``) serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from server.adapters import find
from tests.service import QUICK, Service, add_tenant, chat_rows, worker_pids, write_jsonl
from trainer.adapter_store import LocalAdapterStore
from trainer.layout import Layout
from trainer.processes import wait_for

Code = grpc.StatusCode
# Often: a worker is caught (and put in a cgroup) before it has imported torch.
_wait_for = functools.partial(wait_for, every=0.05)


# ------------------------------------------------------------------ upload


def test_kill9_during_upload_stores_nothing(tmp_path):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    svc = Service(data, {"tiny": str(data / "no-model")}).start()
    channel = grpc.insecure_channel(svc.addr)
    call = channel.stream_unary("/finetune.v1.Trainer/UploadDataset")
    release = threading.Event()
    line = json.dumps(chat_rows("q", "a", 1)[0]).encode() + b"\n"

    def stream():
        yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name="cut")).SerializeToString()
        for _ in range(8):
            yield pb.UploadDatasetRequest(chunk=line * 500).SerializeToString()
        release.wait(30)  # the stream stays open: the service is mid-upload

    fut = call.future(stream(), metadata=[("authorization", f"Bearer {key}")])
    partial = _wait_for(lambda: [p for p in (data / "tmp").iterdir() if p.stat().st_size > 0])
    svc.stop(signal.SIGKILL)
    release.set()
    with pytest.raises(grpc.RpcError):
        fut.result(timeout=30)
    channel.close()
    assert partial[0].exists()  # what the killed process left behind...

    svc = Service(data, {"tiny": str(data / "no-model")}).start()
    try:
        assert not any((data / "tmp").iterdir())  # ...is swept before the service serves
        assert not any((data / "datasets").iterdir())
        assert "unfinished upload" in svc.log()
        with svc.client(key) as a:
            assert a.list_datasets() == []
            f = write_jsonl(tmp_path / "ok.jsonl", chat_rows("q", "a", 12))
            assert a.upload_dataset(f, "cut").num_rows == 12  # the name was never taken
    finally:
        assert svc.stop() == 0


# ------------------------------------------------------------------ dying workers

CGROUP = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def _memory_cgroup(limit_bytes: int):
    """A memory cgroup, v1 or v2, in which the kernel's OOM killer acts; or None (no rights).

    Yields a function that says whether the OOM killer has acted in it.
    """
    name = f"finetune-test-{os.getpid()}"
    v2 = (CGROUP / "cgroup.controllers").is_file()
    path = CGROUP / name if v2 else CGROUP / "memory" / name
    try:
        path.mkdir()
        if v2:
            (path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        yield None, None
        return

    def oom_killed() -> bool:
        stats = (path / ("memory.events" if v2 else "memory.oom_control")).read_text()
        counts = dict(line.split() for line in stats.splitlines())
        return int(counts.get("oom_kill", 0)) > 0

    try:
        yield path, oom_killed
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                path.rmdir()
                break
            time.sleep(0.1)


@pytest.mark.slow
def test_dying_workers_fail_their_job_and_the_next_one_runs(tmp_path, tiny_model_dir):
    """One device slot, four queued jobs: OOM-killed, segfaulted, raising, then the last."""
    data = tmp_path / "data"
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    keys = {"A": add_tenant(data, "acme"), "B": add_tenant(data, "bolt")}
    svc = Service(data, {"tiny": str(tiny_model_dir), "broken": str(broken)}).start()
    try:
        with (
            svc.client(keys["A"]) as a,
            svc.client(keys["B"]) as b,
            _memory_cgroup(64 << 20) as (cgroup, oom_killed),
        ):
            rows = write_jsonl(tmp_path / "d.jsonl", chat_rows("q", "a", 16))
            ds = {"A": a.upload_dataset(rows, "d"), "B": b.upload_dataset(rows, "d")}
            oom = a.create_job("tiny", ds["A"].id, "oom", **QUICK)
            segv = b.create_job("tiny", ds["B"].id, "segv", **QUICK)
            raises = a.create_job("broken", ds["A"].id, "raises", **QUICK)
            healthy = b.create_job("tiny", ds["B"].id, "healthy", **QUICK)

            pid = _wait_for(lambda: worker_pids(oom.id))[0]
            if cgroup is not None:
                # The real thing: the kernel's OOM killer ends it once torch is half imported.
                (cgroup / "cgroup.procs").write_text(str(pid))
            else:
                os.kill(pid, signal.SIGKILL)  # what the OOM killer sends
            done = a.wait(oom.id, 120)
            assert done.state == pb.JOB_STATE_FAILED and done.error_kind == pb.ERROR_KIND_SYSTEM
            assert "SIGKILL" in done.error_message and "out of memory" in done.error_message

            pid = _wait_for(lambda: worker_pids(segv.id))[0]  # the next queued job started
            os.kill(pid, signal.SIGSEGV)
            done = b.wait(segv.id, 120)
            assert done.state == pb.JOB_STATE_FAILED and done.error_kind == pb.ERROR_KIND_SYSTEM
            assert "SIGSEGV" in done.error_message

            done = a.wait(raises.id, 180)  # raises while loading its (broken) base model
            assert done.state == pb.JOB_STATE_FAILED, done.error_message
            assert done.error_message and "Traceback" not in done.error_message
            # The reason names the base model; the server's folders are not shown.
            assert "base model 'broken'" in done.error_message, done.error_message
            assert str(tmp_path) not in done.error_message

            # The queue still moves: the last job starts (and is cancelled, not trained).
            assert _wait_for(lambda: worker_pids(healthy.id))
            assert b.cancel_job(healthy.id).state == pb.JOB_STATE_CANCELLED
            if oom_killed is not None:
                assert oom_killed()  # it was the kernel's OOM killer
        for job in (oom, segv, raises, healthy):
            assert not worker_pids(job.id)
        assert svc.proc.poll() is None  # the service itself never went down
    finally:
        assert svc.stop() == 0


# ------------------------------------------------------------------ publishing


class _KillMidCopy:
    """fanotify permission events on a mount: the moment ``pid`` opens a second file inside a
    staging folder (the first one copied and fsynced), ``pid`` is SIGKILLed, blocked in that
    open. A kill at an exact point in the middle of publishing, with no hook in the code."""

    FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_MARK_MOUNT = 0x04, 0x01, 0x01, 0x10
    FAN_OPEN_PERM, FAN_ALLOW, AT_FDCWD = 0x10000, 0x01, -100

    def __init__(self, mount: Path, staging: Path, pid: int) -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.fd = libc.fanotify_init(self.FAN_CLASS_CONTENT | self.FAN_CLOEXEC, os.O_RDONLY)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        if libc.fanotify_mark(
            self.fd,
            self.FAN_MARK_ADD | self.FAN_MARK_MOUNT,
            self.FAN_OPEN_PERM,
            self.AT_FDCWD,
            bytes(mount),
        ):
            raise OSError(ctypes.get_errno(), "fanotify_mark")
        self.staging, self.pid = str(staging) + "/", pid
        self.seen: list[str] = []
        self.killed_at: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            buf = os.read(self.fd, 4096)
            off = 0
            while off < len(buf):
                ev_len, _, _, _, _, efd, pid = struct.unpack_from("IBBHQii", buf, off)
                off += ev_len
                try:
                    path = os.readlink(f"/proc/self/fd/{efd}")
                    if pid == self.pid and path.startswith(self.staging) and not self.killed_at:
                        if self.seen and path != self.seen[0]:
                            os.kill(pid, signal.SIGKILL)
                            self.killed_at = path
                        self.seen.append(path)
                finally:  # every open is answered, or the opener would wait forever
                    os.write(self.fd, struct.pack("iI", efd, self.FAN_ALLOW))
                    os.close(efd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` while in the block; skips without root."""
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_volume(tmp_path):
    """DATA with its adapters folder on its own 16 MiB tmpfs, which a test can fill."""
    data = tmp_path / "data"
    adapters = data / "adapters"
    adapters.mkdir(parents=True)
    with _tmpfs(adapters, "16m"):
        yield data


@pytest.mark.slow
def test_kill9_mid_publish_and_a_full_disk_keep_the_served_version(
    small_volume, tmp_path, tiny_model_dir, tree_hash
):
    data = small_volume
    layout = Layout(data)
    key = add_tenant(data, "acme")
    models = {"tiny": str(tiny_model_dir)}
    svc = Service(data, models).start()
    rows = write_jsonl(tmp_path / "d.jsonl", chat_rows("What is the secret word?", "kiwi", 16))

    def served() -> Path | None:
        found = find(LocalAdapterStore(layout), "acme/secret", ["tiny"])
        return found.path if found else None

    try:
        with svc.client(key) as a:
            ds = a.upload_dataset(rows, "d")
            v1 = a.wait(a.create_job("tiny", ds.id, "secret", **QUICK).id, 300)
            assert v1.state == pb.JOB_STATE_SUCCEEDED, v1.error_message
            v1_dir = layout.version_dir("acme", "secret", "v0001")
            v1_tree = tree_hash(v1_dir)
            assert served() == v1_dir

            # 1. SIGKILL in the middle of copying the new version into its staging folder.
            try:
                killer = _KillMidCopy(layout.adapters, layout.staging, svc.proc.pid)
            except OSError as e:  # fanotify permission events need CAP_SYS_ADMIN
                pytest.skip(f"fanotify is not available here: {e}")
            job2 = a.create_job("tiny", ds.id, "secret", **QUICK)
            try:
                _wait_for(lambda: killer.killed_at, timeout=300)
            finally:
                killer.close()
        assert svc.proc.wait(30) == -signal.SIGKILL
        stage = Path(killer.killed_at).parent
        assert stage.parent == layout.staging and stage.is_dir()  # half a version, staged
        assert served() == v1_dir and tree_hash(v1_dir) == v1_tree  # v1 is what is served
        assert layout.versions("acme", "secret") == ["v0001"]

        # 2. And the volume is full when the service comes back: the resumed job cannot
        #    publish. It fails with the reason; v1 stays intact and served.
        st = os.statvfs(layout.adapters)
        filler = layout.adapters / ".filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 8192))
        svc = Service(data, models).start()
        assert not any(layout.staging.iterdir())  # the half-staged folder is swept
        with svc.client(key) as a:
            done = a.wait(job2.id, 300)
            events = [e.message for e in a.watch_job(job2.id)]
            assert any("resume from checkpoint" in m for m in events), events
            assert done.state == pb.JOB_STATE_FAILED, svc.log()[-3000:]
            assert done.error_kind == pb.ERROR_KIND_SYSTEM
            assert "No space left on device" in done.error_message, done.error_message
            assert "v0001 is still the one served" in done.error_message
            assert str(data) not in done.error_message  # no server paths to the tenant
            assert layout.versions("acme", "secret") == ["v0001"]
            assert not any(layout.staging.iterdir())
            assert served() == v1_dir and tree_hash(v1_dir) == v1_tree
            assert [(x.name, x.version) for x in a.list_adapters()] == [("secret", "v0001")]
        filler.unlink()
    finally:
        svc.stop()


def test_a_full_disk_during_upload_is_resource_exhausted_and_keeps_nothing(tmp_path):
    """DATA on a small tmpfs: an upload that does not fit is RESOURCE_EXHAUSTED (gRPC's code
    for a full file system), leaves no partial file, and the service carries on."""
    data = tmp_path / "data"
    data.mkdir()
    with _tmpfs(data, "4m"):
        key = add_tenant(data, "acme")
        svc = Service(data, {"tiny": str(tmp_path / "no-model")}).start()
        try:
            with svc.client(key) as a:
                big = write_jsonl(tmp_path / "big.jsonl", chat_rows("q" * 500, "a" * 500, 5000))
                assert big.stat().st_size > 4 << 20
                with pytest.raises(grpc.RpcError) as e:
                    a.upload_dataset(big, "big")
                assert e.value.code() == Code.RESOURCE_EXHAUSTED, e.value.details()
                assert "space" in e.value.details() and str(data) not in e.value.details()
                assert not any((data / "tmp").iterdir())
                assert not any((data / "datasets").iterdir())
                small = write_jsonl(tmp_path / "small.jsonl", chat_rows("q", "a", 12))
                ds = a.upload_dataset(small, "small")  # still serving
                assert [d.name for d in a.list_datasets()] == [ds.name]
                # Full to the last block: the job store cannot write either.
                st = os.statvfs(data)
                with open(data / "filler", "wb") as f, contextlib.suppress(OSError):
                    f.write(b"\0" * (st.f_bavail * st.f_frsize))
                created = []
                with pytest.raises(grpc.RpcError) as e:
                    for i in range(200):  # until the job store's file has to grow
                        created.append(a.create_job("tiny", ds.id, f"full-{i}").id)
                        a.cancel_job(created[-1])
                assert e.value.code() == Code.RESOURCE_EXHAUSTED, e.value.details()
                (data / "filler").unlink()
                # The refused call kept nothing: the jobs are exactly those accepted.
                assert sorted(j.id for j in a.list_jobs()) == sorted(created)
                assert a.get_dataset(ds.id).sha256 == ds.sha256
        finally:
            assert svc.stop() == 0
