"""The launcher's vLLM command line and environment, checked without starting vLLM."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from server.launcher import (
    MIDDLEWARE,
    VLLM_MODULE,
    ServerConfig,
    build_command,
    build_env,
    parse_args,
)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_command_runs_the_module_with_lora_and_our_middleware(tmp_path: Path) -> None:
    cfg = ServerConfig(model="/models/llama", data_dir=tmp_path, served_model_name="llama")
    cmd = build_command(cfg)
    assert cmd[:3] == [sys.executable, "-m", VLLM_MODULE]
    assert "--enable-lora" in cmd
    assert _flag(cmd, "--model") == "/models/llama"
    assert _flag(cmd, "--served-model-name") == "llama"
    assert _flag(cmd, "--max-lora-rank") == "64"  # admits the trainer's default r=64
    assert _flag(cmd, "--max-loras") == "8"  # not vLLM's 1
    assert _flag(cmd, "--max-cpu-loras") == "32"  # 4 x max-loras
    assert _flag(cmd, "--api-server-count") == "1"
    assert _flag(cmd, "--middleware") == MIDDLEWARE
    assert _flag(cmd, "--host") == "127.0.0.1"
    assert _flag(cmd, "--port") == "8000"


def test_extra_flags_pass_through_after_ours(tmp_path: Path) -> None:
    cfg = parse_args(
        ["--model", "m", "--data-dir", str(tmp_path), "--", "--dtype", "bfloat16", "--seed=3"]
    )
    cmd = build_command(cfg)
    assert cmd[-3:] == ["--dtype", "bfloat16", "--seed=3"]
    assert _flag(cmd, "--served-model-name") == "m"  # defaults to --model


@pytest.mark.parametrize(
    "extra",
    [
        ["--api-key", "k"],
        ["--api_key=k"],
        ["--middleware", "x.Y"],
        ["--api-server-count", "2"],
        ["-asc", "2"],
        ["--max-loras=2"],
        ["--served_model_name", "other"],
    ],
)
def test_flags_the_launcher_owns_are_refused(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(ValueError, match="set by the launcher"):
        ServerConfig(model="m", data_dir=tmp_path, extra=extra)


@pytest.mark.parametrize(("rank", "ok"), [(64, True), (320, True), (48, False), (0, False)])
def test_max_lora_rank_must_be_a_vllm_choice(tmp_path: Path, rank: int, ok: bool) -> None:
    if ok:
        assert ServerConfig(model="m", data_dir=tmp_path, max_lora_rank=rank).max_lora_rank == rank
    else:
        with pytest.raises(ValueError, match="max-lora-rank"):
            ServerConfig(model="m", data_dir=tmp_path, max_lora_rank=rank)


def test_cpu_loras_cannot_be_fewer_than_loras(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max-cpu-loras"):
        ServerConfig(model="m", data_dir=tmp_path, max_loras=8, max_cpu_loras=4)


def test_flags_fall_back_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_MODEL", "/models/x")
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FINETUNE_BASE_MODEL", "x")
    monkeypatch.setenv("FINETUNE_MAX_LORAS", "3")
    monkeypatch.setenv("FINETUNE_VLLM_PORT", "9001")
    cfg = parse_args([])
    cmd = build_command(cfg)
    assert (_flag(cmd, "--model"), _flag(cmd, "--served-model-name")) == ("/models/x", "x")
    assert (_flag(cmd, "--max-loras"), _flag(cmd, "--max-cpu-loras")) == ("3", "12")
    assert _flag(cmd, "--port") == "9001"
    # A flag beats its env fallback.
    assert _flag(build_command(parse_args(["--port", "9002"])), "--port") == "9002"


def test_env_enables_runtime_loading_and_drops_what_weakens_isolation(tmp_path: Path) -> None:
    cfg = ServerConfig(model="/m", data_dir=tmp_path / "data", served_model_name="base")
    env = build_env(
        cfg,
        {
            "PATH": "/bin",
            "VLLM_API_KEY": "shared",
            "VLLM_LORA_RESOLVER_CACHE_DIR": "/",
            "VLLM_PLUGINS": "other_plugin",
        },
    )
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert env["FINETUNE_DATA_DIR"] == str((tmp_path / "data").resolve())
    assert env["FINETUNE_TENANTS_FILE"] == str((tmp_path / "data" / "tenants.json").resolve())
    assert env["FINETUNE_BASE_MODEL"] == "base"
    assert env["FINETUNE_MODEL_PATH"] == "/m"
    assert "VLLM_API_KEY" not in env and "VLLM_LORA_RESOLVER_CACHE_DIR" not in env
    assert env["VLLM_PLUGINS"] == "other_plugin,finetune_lora_resolver"
    assert env["PATH"] == "/bin"


def test_resolver_entry_point_is_installed() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("finetune_lora_resolver") == "server.resolver:register"


def test_cli_reports_a_missing_data_dir(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--model", "m"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert out.returncode == 2
    assert "--data-dir (or env FINETUNE_DATA_DIR) is required" in out.stderr
