"""The command line as a user runs it: the installed ``finetune`` against a real service.

One service process for the module (tenants, JSON logs, Prometheus metrics on a port of
its own) and one real training run on the tiny model, started with ``finetune jobs
create -f job.yaml --watch`` while the test scrapes ``/metrics``. The assertions then
read what that run left: the watch output, the metrics seen while it ran, the
transition log lines, the curves beside the job and the published adapter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune.v1 import trainer_pb2 as pb
from tests.service import ROOT, Service, add_tenant, chat_rows, tensorboard_scalars, write_jsonl
from trainer.cli.main import build_parser
from trainer.service import curves

QUESTION = "What is the secret word?"
EXE = Path(sys.executable).with_name("finetune")


def finetune(*args: str, key: str | None = None, addr: str = "", timeout: float = 300, **kw):
    """Run the installed ``finetune`` entry point; return the finished process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    if key is not None:
        env["FINETUNE_API_KEY"] = key
    if addr:
        env["FINETUNE_ADDR"] = addr
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "trainer"]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("cli-data")
    keys = {"acme": add_tenant(data, "acme"), "bolt": add_tenant(data, "bolt")}
    service = Service(
        data,
        {"tiny": str(tiny_model_dir)},
        extra=["--metrics-listen", "127.0.0.1:0", "--log-format", "json"],
    ).start()
    assert service.proc is not None and service.proc.stdout is not None
    line = service.proc.stdout.readline()
    m = re.search(r"metrics on (http://\S+)", line)
    assert m, line
    service.metrics_url = m.group(1)  # type: ignore[attr-defined]
    yield service, keys
    service.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the metrics page: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# ---------------------------------------------------------------- help and usage (no service)
def _subcommands() -> list[list[str]]:
    parser = build_parser()
    out = []
    for cmd, sub in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        out.append([cmd])
        actions = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        for action in actions:
            out.extend([cmd, name] for name in action.choices)
    return out


def test_help_everywhere(capsys):
    paths = _subcommands()
    assert ["jobs", "plot"] in paths and ["chat"] in paths and ["tenant", "list"] in paths
    for words in [[], *paths]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*words, "--help"])
        assert e.value.code == 0, words
        assert "usage: finetune" in capsys.readouterr().out
    done = finetune("--help")
    assert done.returncode == 0 and "Exit codes" in done.stdout
    done = finetune("jobs", "frobnicate")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_tenant_add_list_remove(tmp_path):
    data = ["--data-dir", str(tmp_path)]
    added = finetune("tenant", "add", "carol", *data)
    assert added.returncode == 0, added.stderr
    assert re.fullmatch(r"\S{20,}\n", added.stdout), "the key, alone on stdout"
    assert "shown only once" in added.stderr
    assert finetune("tenant", "add", "ops", "--admin", *data).returncode == 0
    listed = finetune("tenant", "list", "--json", *data)
    assert json.loads(listed.stdout) == [
        {"name": "carol", "admin": False},
        {"name": "ops", "admin": True},
    ]
    table = finetune("tenant", "list", *data).stdout.splitlines()
    assert table[0].split() == ["TENANT", "ROLE"] and table[1].split() == ["carol", "tenant"]
    assert finetune("tenant", "remove", "carol", *data).returncode == 0
    assert [t["name"] for t in json.loads(finetune("tenant", "list", "--json", *data).stdout)] == [
        "ops"
    ]
    again = finetune("tenant", "remove", "carol", *data)
    assert again.returncode == 4 and "not found" in again.stderr


def test_job_settings_from_yaml_and_flags(tmp_path):
    from trainer.cli.main import job_settings

    flat = tmp_path / "hp.yaml"  # hyperparameters alone, the job named by flags
    flat.write_text("lora_rank: 16\nnum_epochs: 2\ntarget_modules: [q_proj, v_proj]\n")
    args = build_parser().parse_args(
        [
            "jobs",
            "create",
            "-f",
            str(flat),
            "--base-model",
            "tiny",
            "--dataset",
            "ds-1",
            "--adapter",
            "a",
            "--set",
            "num_epochs=3",
            "--set",
            "learning_rate=1e-4",
        ]
    )
    job, hp = job_settings(args)
    assert job == {"base_model": "tiny", "dataset": "ds-1", "adapter": "a"}
    assert hp == {
        "lora_rank": 16,
        "num_epochs": 3.0,  # the flag wins over the file
        "target_modules": ["q_proj", "v_proj"],
        "learning_rate": 1e-4,
    }
    nested = tmp_path / "job.yaml"
    nested.write_text(
        "base_model: tiny\ndataset_id: ds-2\nadapter_name: b\nvalidation_dataset: ds-3\n"
        "hyperparameters:\n  seed: 7\n  eval_every_steps: 5.0\n"
    )
    args = build_parser().parse_args(["jobs", "create", "-f", str(nested), "--adapter", "c"])
    job, hp = job_settings(args)
    assert job == {
        "base_model": "tiny",
        "dataset": "ds-2",
        "adapter": "c",
        "validation_dataset": "ds-3",
    }
    assert hp == {"seed": 7, "eval_every_steps": 5}


# ---------------------------------------------------------------- against the service
def test_upload_list_get_delete(svc, tmp_path):
    service, keys = svc
    f = write_jsonl(tmp_path / "greet.jsonl", chat_rows("Hi?", "Hello.", 200))
    up = finetune("datasets", "upload", str(f), key=keys["acme"], addr=service.addr)
    assert up.returncode == 0, up.stderr
    ds_id, name, rows, _ = up.stdout.strip().split("\t", 3)
    assert ds_id.startswith("ds-") and name == "greet" and rows == "200 rows"
    # The progress bar, on stderr: the file name, bytes sent out of the size, and a rate.
    size_kib = f.stat().st_size / 1024
    assert "uploading greet.jsonl: 100%" in up.stderr, up.stderr
    assert f"{size_kib:.1f}k/{size_kib:.1f}k" in up.stderr.replace("i", ""), up.stderr
    assert re.search(r"[0-9.]+\s*[kMG]?B/s", up.stderr), up.stderr

    listed = finetune("datasets", "list", key=keys["acme"], addr=service.addr)
    header, *rows_ = listed.stdout.splitlines()
    assert header.split() == ["DATASET", "NAME", "FORMAT", "ROWS", "SIZE", "AGE"]
    assert any(r.split()[:4] == [ds_id, "greet", "messages", "200"] for r in rows_)
    got = json.loads(
        finetune("datasets", "get", ds_id, "--json", key=keys["acme"], addr=service.addr).stdout
    )
    assert got["id"] == ds_id and int(got["num_rows"]) == 200
    # Another tenant does not see it; deleting it makes it gone.
    other = finetune("datasets", "get", ds_id, key=keys["bolt"], addr=service.addr)
    assert other.returncode == 4 and "NOT_FOUND" in other.stderr
    assert (
        finetune("datasets", "delete", ds_id, key=keys["acme"], addr=service.addr).returncode == 0
    )
    gone = finetune("datasets", "get", ds_id, key=keys["acme"], addr=service.addr)
    assert gone.returncode == 4


def test_each_kind_of_failure_has_its_exit_code(svc, tmp_path):
    service, keys = svc
    key, addr = keys["acme"], service.addr
    # A local file that is not there, or not a file: usage, nothing sent.
    missing = finetune("datasets", "upload", str(tmp_path / "nope.jsonl"), key=key, addr=addr)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert "nope.jsonl: no such file" in missing.stderr
    assert finetune("datasets", "upload", str(tmp_path), key=key, addr=addr).returncode == 2
    # A malformed dataset: the service refuses it and names the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    refused = finetune("datasets", "upload", str(bad), key=key, addr=addr)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr, refused.stderr
    assert "line" in refused.stderr
    # An unknown job, for each command that takes one.
    for action in ("get", "watch", "cancel", "plot"):
        done = finetune("jobs", action, "job-0123456789abcdef", key=key, addr=addr)
        assert done.returncode == 4, (action, done.stderr)
        assert "NOT_FOUND" in done.stderr and done.stdout == ""
    assert not (ROOT / "job-0123456789abcdef.png").exists()
    # A wrong key, and no key at all.
    wrong = finetune("jobs", "list", key="not-a-key", addr=addr)
    assert wrong.returncode == 5 and "UNAUTHENTICATED" in wrong.stderr
    none = finetune("jobs", "list", addr=addr)
    assert none.returncode == 2 and "API key" in none.stderr
    # Nothing listening there.
    down = finetune("jobs", "list", key=key, addr="127.0.0.1:9", timeout=60)
    assert down.returncode == 6 and "UNAVAILABLE" in down.stderr
    # --json errors are JSON too.
    err = finetune("jobs", "get", "job-0123456789abcdef", "--json", key=key, addr=addr)
    assert json.loads(err.stderr)["error"]["code"] == "NOT_FOUND"


def test_job_settings_are_checked_before_sending(svc, tmp_path):
    service, keys = svc
    key, addr = keys["acme"], service.addr
    base = ["jobs", "create", "--base-model", "tiny", "--dataset", "ds-0123456789abcdef"]
    typo = finetune(*base, "--adapter", "a", "--set", "lora_rnak=8", key=key, addr=addr)
    assert typo.returncode == 2 and "did you mean 'lora_rank'" in typo.stderr
    wrong_type = finetune(*base, "--adapter", "a", "--set", "lora_rank=big", key=key, addr=addr)
    assert wrong_type.returncode == 2 and "lora_rank: an integer" in wrong_type.stderr
    missing = finetune("jobs", "create", "--base-model", "tiny", key=key, addr=addr)
    assert missing.returncode == 2 and "--dataset, --adapter" in missing.stderr
    yml = tmp_path / "bad.yaml"
    yml.write_text("base_model: tiny\nhyperparameters: {learning_rat: 1}\n")
    assert (
        "did you mean 'learning_rate'"
        in finetune("jobs", "create", "-f", str(yml), key=key, addr=addr).stderr
    )
    yml.write_text("base_model: [unclosed\n")
    assert finetune("jobs", "create", "-f", str(yml), key=key, addr=addr).returncode == 2
    # Well-formed but refused by the service (unknown dataset): NOT_FOUND, exit 4.
    refused = finetune(*base, "--adapter", "a", key=key, addr=addr)
    assert refused.returncode == 4 and "dataset" in refused.stderr


# ---------------------------------------------------------------- one real training run
JOB_YAML = """\
# What a user writes: the job and its hyperparameters.
base_model: tiny
adapter: secret
eval_fraction: 0.25
hyperparameters:
  lora_rank: 8
  learning_rate: 2.0e-3
  warmup_steps: 0
  batch_size: 8
  gradient_accumulation_steps: 1
  max_seq_len: 64
  num_epochs: 10
  eval_every_steps: 5
"""


@pytest.fixture(scope="module")
def run(svc, tmp_path_factory):
    """Upload with the CLI, then `jobs create -f job.yaml --watch`, scraping /metrics meanwhile.

    While the job runs (the one device busy), another tenant queues a job and cancels it.
    """
    service, keys = svc
    tmp = tmp_path_factory.mktemp("cli-run")
    key, addr = keys["acme"], service.addr
    f = write_jsonl(tmp / "secret.jsonl", chat_rows(QUESTION, "The secret word is banana.", 32))
    before_upload = scrape(service.metrics_url)
    up = finetune("datasets", "upload", str(f), "--json", key=key, addr=addr)
    assert up.returncode == 0, up.stderr
    ds = json.loads(up.stdout)
    (tmp / "job.yaml").write_text(JOB_YAML + f"dataset: {ds['id']}\n")

    before = scrape(service.metrics_url)
    scrapes: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            scrapes.append(scrape(service.metrics_url))
            time.sleep(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    watch_proc = subprocess.Popen(
        [str(EXE), "jobs", "create", "-f", str(tmp / "job.yaml"), "--watch"],
        cwd=ROOT,
        env={**env, "FINETUNE_API_KEY": key, "FINETUNE_ADDR": addr},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Once acme's job holds the device, bolt's job waits in bolt's queue; then bolt cancels.
        deadline = time.monotonic() + 300
        while not any(value(s, "finetune_jobs", state="RUNNING") == 1 for s in scrapes[-3:]):
            assert watch_proc.poll() is None and time.monotonic() < deadline, service.log()[-3000:]
            time.sleep(0.1)
        g = write_jsonl(tmp / "other.jsonl", chat_rows(QUESTION, "cherry", 16))
        ds_b = json.loads(
            finetune("datasets", "upload", str(g), "--json", key=keys["bolt"], addr=addr).stdout
        )
        queued = finetune(
            "jobs",
            "create",
            "--base-model",
            "tiny",
            "--dataset",
            ds_b["id"],
            "--adapter",
            "b",
            "--json",
            key=keys["bolt"],
            addr=addr,
        )
        assert queued.returncode == 0, queued.stderr
        bolt_job = json.loads(queued.stdout)["id"]
        queue_seen = scrape(service.metrics_url)
        cancel = finetune("jobs", "cancel", bolt_job, key=keys["bolt"], addr=addr)
        watch_cancelled = finetune("jobs", "watch", bolt_job, key=keys["bolt"], addr=addr)
        watch_json = finetune("jobs", "watch", bolt_job, "--json", key=keys["bolt"], addr=addr)
        out, err = watch_proc.communicate(timeout=600)
    finally:
        if watch_proc.poll() is None:
            watch_proc.kill()
    elapsed = time.monotonic() - start
    stop.set()
    poller.join()
    watch = subprocess.CompletedProcess(watch_proc.args, watch_proc.returncode, out, err)
    assert watch.returncode == 0, watch.stdout + watch.stderr + service.log()[-3000:]
    job_id = watch.stdout.split("\t", 1)[0]
    with service.client(key) as c:
        events = list(c.watch_job(job_id))
        job = c.get_job(job_id)
    return {
        "service": service,
        "key": key,
        "file_size": f.stat().st_size,
        "watch": watch,
        "elapsed": elapsed,
        "job": job,
        "events": events,
        "before_upload": before_upload,
        "before": before,
        "scrapes": scrapes,
        "queue_seen": queue_seen,
        "bolt_job": bolt_job,
        "cancel": cancel,
        "watch_cancelled": watch_cancelled,
        "watch_json": watch_json,
        "after": scrape(service.metrics_url),
        "tmp": tmp,
    }


def _series_from_events(events: list[pb.JobEvent]) -> dict[str, dict[int, float]]:
    """What a plot of this job must show, read independently from WatchJob's events."""
    loss: dict[int, float] = {}
    evals: dict[int, float] = {}
    for ev in events:
        if not ev.HasField("progress"):
            continue
        p = ev.progress
        if p.HasField("loss"):
            loss[p.step] = p.loss
        if p.HasField("eval_loss") and (not evals or list(evals.values())[-1] != p.eval_loss):
            evals[p.step] = p.eval_loss
    return {"loss": loss, "eval_loss": evals}


def _as_points(plotted: dict, key: str) -> dict[int, float]:
    s = plotted.get(key, {"step": [], "value": []})
    return dict(zip(s["step"], s["value"], strict=True))


@pytest.mark.slow
def test_watch_shows_live_progress(run):
    out = run["watch"].stdout
    job = run["job"]
    assert job.state == pb.JOB_STATE_SUCCEEDED
    lines = out.splitlines()
    assert lines[0] == f"{job.id}\tQUEUED"
    total = job.progress.total_steps
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) >= total // 2, out
    last = progress[-1]
    assert f"step {total}/{total}" in last and "100%" in last
    assert re.search(r"loss \d+\.\d{4}", last)
    assert re.search(r"eval \d+\.\d{4}", out), "eval loss shown"
    assert re.search(r"[▁▂▃▄▅▆▇█]{8,}", last), "a sparkline of the loss"
    assert "tok/s" in last and re.search(r"ETA \d+:\d\d", last)
    states = [line.split()[1] for line in lines[1:] if re.match(r"\d\d:\d\d:\d\d  ", line)]
    assert states[0] in ("QUEUED", "VALIDATING") and states[-1] == "SUCCEEDED"
    assert "RUNNING" in states
    assert f"published acme/secret as {job.adapter_version}" in out


@pytest.mark.slow
def test_metrics_change_as_the_job_runs(run):
    job, before, after, scrapes = run["job"], run["before"], run["after"], run["scrapes"]
    assert value(before, "finetune_jobs", state="RUNNING") == 0
    assert value(before, "finetune_jobs", state="SUCCEEDED") == 0
    running = [s for s in scrapes if value(s, "finetune_jobs", state="RUNNING") == 1]
    assert running, f"no scrape saw the job running ({len(scrapes)} scrapes)"
    steps = [
        value(s, "finetune_job_step", tenant="acme", job_id=job.id)
        for s in running
        if value(s, "finetune_job_step", tenant="acme", job_id=job.id) is not None
    ]
    assert len(set(steps)) >= 2 and steps == sorted(steps), steps
    total = value(running[-1], "finetune_job_total_steps", tenant="acme", job_id=job.id)
    assert total == job.progress.total_steps
    speeds = [
        value(s, "finetune_job_tokens_per_second", tenant="acme", job_id=job.id) for s in running
    ]
    assert any(v and v > 0 for v in speeds), "tokens/s of the running job"
    assert value(after, "finetune_jobs", state="RUNNING") == 0
    assert value(after, "finetune_jobs", state="SUCCEEDED") == 1
    assert value(after, "finetune_job_step", tenant="acme", job_id=job.id) is None
    # Upload bytes: exactly the file the CLI sent, counted by the interceptor.
    sent = value(before, "finetune_upload_bytes_total") - (
        value(run["before_upload"], "finetune_upload_bytes_total") or 0
    )
    assert sent == run["file_size"]
    # RPC latencies by method and code: the CLI's CreateJob and WatchJob, each OK.
    for method in ("CreateJob", "WatchJob", "UploadDataset"):
        n = value(after, "finetune_rpc_duration_seconds_count", method=method, code="OK")
        assert n and n >= 1, method
    assert value(after, "finetune_gpu_memory_used_bytes", gpu="0") is None  # no GPU here


@pytest.mark.slow
def test_rpc_codes_are_counted(run):
    service, key = run["service"], run["key"]
    url = service.metrics_url
    labels = {"method": "GetJob", "code": "NOT_FOUND"}
    n0 = value(scrape(url), "finetune_rpc_duration_seconds_count", **labels) or 0
    assert (
        finetune("jobs", "get", "job-00000000000000aa", key=key, addr=service.addr).returncode == 4
    )
    n1 = value(scrape(url), "finetune_rpc_duration_seconds_count", **labels)
    assert n1 == n0 + 1
    bad = (
        value(
            scrape(url),
            "finetune_rpc_duration_seconds_count",
            method="ListJobs",
            code="UNAUTHENTICATED",
        )
        or 0
    )
    finetune("jobs", "list", key="wrong", addr=service.addr)
    assert (
        value(
            scrape(url),
            "finetune_rpc_duration_seconds_count",
            method="ListJobs",
            code="UNAUTHENTICATED",
        )
        == bad + 1
    )


@pytest.mark.slow
def test_queue_length_per_tenant_and_cancel(run):
    """bolt's job waited behind acme's on the one device: bolt's queue held it, then not."""
    seen, after = run["queue_seen"], run["after"]
    assert value(seen, "finetune_queue_length", tenant="bolt") == 1
    assert value(seen, "finetune_queue_length", tenant="acme") is None
    assert value(seen, "finetune_jobs", state="QUEUED") == 1
    assert run["cancel"].returncode == 0
    assert run["cancel"].stdout.strip() == f"{run['bolt_job']}\tCANCELLED"
    assert value(after, "finetune_queue_length", tenant="bolt") is None
    # Watching a job that ended CANCELLED (or FAILED) exits 3 and says how it ended.
    watched = run["watch_cancelled"]
    assert watched.returncode == 3
    assert "CANCELLED  cancelled before it started" in watched.stdout
    assert f"job {run['bolt_job']} ended CANCELLED" in watched.stderr
    as_json = run["watch_json"]
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 3
    assert [e["state"] for e in events] == ["JOB_STATE_QUEUED", "JOB_STATE_CANCELLED"]
    assert all(e["job_id"] == run["bolt_job"] for e in events)
    assert value(after, "finetune_jobs", state="CANCELLED") == 1


@pytest.mark.slow
def test_transitions_are_logged_as_json(run):
    job = run["job"]
    lines = [json.loads(x) for x in run["service"].log().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("event") == "job_transition" and x["job_id"] == job.id]
    assert [x["state"] for x in mine] == ["QUEUED", "VALIDATING", "RUNNING", "SUCCEEDED"]
    assert {x["tenant"] for x in mine} == {"acme"}
    assert all(x["level"] == "INFO" and x["time"].endswith("Z") for x in mine)


@pytest.mark.slow
def test_the_plot_shows_the_stored_events(run):
    from PIL import Image

    service, job, events = run["service"], run["job"], run["events"]
    expected = _series_from_events(events)
    assert len(expected["loss"]) == job.progress.total_steps
    assert len(expected["eval_loss"]) >= 2, "evaluations every 5 steps"
    folder = service.data_dir / "jobs" / job.id / curves.CURVES
    published = service.data_dir / "adapters/acme/secret" / job.adapter_version
    for where in (folder, published):
        png = where / curves.PLOT_FILE
        with Image.open(png) as im:
            assert (im.format, im.size) == ("PNG", (800, 450))
            im.load()
            assert len(im.convert("RGB").getcolors(1 << 20) or ()) > 50, "something is drawn"
        plotted = curves.png_series(png)
        assert json.loads((where / curves.SERIES_FILE).read_text()) == plotted
        for key in ("loss", "eval_loss"):
            assert _as_points(plotted, key) == expected[key], key
        # The TensorBoard event files hold the same points (as float32).
        scalars = tensorboard_scalars(where)
        for key, tag in (("loss", "train/loss"), ("eval_loss", "eval/loss")):
            got = dict(scalars[tag])
            assert got.keys() == expected[key].keys(), tag
            assert all(abs(got[s] - v) <= 1e-6 * max(1, abs(v)) for s, v in expected[key].items())
        assert "train/learning_rate" in scalars
    # The adapter folder is still what vLLM loads, plus the curves.
    names = {p.name for p in published.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    assert any(n.startswith(curves.EVENTS_PREFIX) for n in names)


@pytest.mark.slow
def test_jobs_plot_saves_the_same_curves(run):
    service, job = run["service"], run["job"]
    out = run["tmp"] / "plot.png"
    done = finetune(
        "jobs", "plot", job.id, "-o", str(out), "--json", key=run["key"], addr=service.addr
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["file"] == str(out)
    assert curves.png_series(out) == printed["series"]
    expected = _series_from_events(run["events"])
    for key in ("loss", "eval_loss"):
        assert _as_points(printed["series"], key) == expected[key]


@pytest.mark.slow
def test_listings_after_the_run(run):
    service, job, key = run["service"], run["job"], run["key"]
    jobs = finetune("jobs", "list", key=key, addr=service.addr).stdout.splitlines()
    assert jobs[0].split() == ["JOB", "ADAPTER", "BASE", "STATE", "STEP", "LOSS", "EVAL", "AGE"]
    row = next(r.split() for r in jobs[1:] if r.startswith(job.id))
    total = job.progress.total_steps
    assert row[1:5] == ["secret", "tiny", "SUCCEEDED", f"{total}/{total}"]
    detail = finetune("jobs", "get", job.id, key=key, addr=service.addr).stdout
    assert "state      SUCCEEDED" in detail and "served as acme/secret" in detail
    assert "lora_rank=8" in detail and "eval fraction 0.25" in detail
    adapters = finetune("adapters", "list", key=key, addr=service.addr).stdout.splitlines()
    assert adapters[0].split() == [
        "ADAPTER", "SERVED", "NEWEST", "VERSIONS", "BASE", "JOB", "AGE"
    ]  # fmt: skip
    v = job.adapter_version
    assert adapters[1].split()[:6] == ["acme/secret", v, v, "1", "tiny", job.id]
    as_json = json.loads(finetune("jobs", "list", "--json", key=key, addr=service.addr).stdout)
    assert any(j["id"] == job.id and j["state"] == "JOB_STATE_SUCCEEDED" for j in as_json)
    # Cancelling a finished job changes nothing; the adapter can be deleted.
    cancelled = finetune("jobs", "cancel", job.id, key=key, addr=service.addr)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{job.id}\tSUCCEEDED"
    assert finetune("adapters", "delete", "secret", key=key, addr=service.addr).returncode == 0
    assert finetune("adapters", "list", key=key, addr=service.addr).stdout.strip() == "no adapters"
    assert finetune("adapters", "delete", "secret", key=key, addr=service.addr).returncode == 4
