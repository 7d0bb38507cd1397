"""Settings are written once: on a config dataclass field, from which the flags are made
(trainer/flags.py). Each default lives in one place, and a test finds a second one."""

from __future__ import annotations

import argparse
import ast
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import pytest

import trainer.cli.main as cli
from server.launcher import ServerConfig
from trainer.config import ServiceConfig, parse_base_models
from trainer.flags import add_flags, from_flags

ROOT = Path(__file__).resolve().parents[1]
# The two processes' settings. (Hyperparameters have one source too, JobConfig, but their
# names, seed or batch_size, also name unrelated parameters elsewhere.)
SETTINGS = (ServiceConfig, ServerConfig)


@dataclass
class Example:
    rank: int = field(default=64, metadata={"help": "A rank.", "env": "EXAMPLE_RANK"})
    share: float | None = field(default=None, metadata={"help": "A share."})
    where: Path = field(default=Path("here"), metadata={"help": "A folder."})
    models: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Models.", "env": "EXAMPLE_MODELS", "append": True,
                  "flag": "--model", "parse": parse_base_models},
    )  # fmt: skip


def _parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    return from_flags(Example, parser.parse_args(argv))


def test_flags_take_the_fields_defaults_types_and_environment(monkeypatch) -> None:
    assert _parse([]) == Example()
    assert _parse(["--rank", "8", "--share", "0.5", "--where", "/x"]) == Example(8, 0.5, Path("/x"))
    monkeypatch.setenv("EXAMPLE_RANK", "16")
    assert _parse([]).rank == 16  # the variable stands in for the flag
    assert _parse(["--rank", "32"]).rank == 32  # and the flag wins over it
    monkeypatch.setenv("EXAMPLE_MODELS", "a=/m/a,b=/m/b")
    got = _parse(["--model", "b=/other", "--model", "/m/c"]).models
    assert got == {"a": "/m/a", "b": "/other", "c": "/m/c"}  # variable first, flags after


@dataclass
class Switch:
    keep: bool = field(default=False, metadata={"help": "Keep.", "env": "EXAMPLE_KEEP"})


def test_a_bool_field_is_a_flag_pair_and_reads_its_variable(monkeypatch) -> None:
    def parse(argv: list[str]) -> bool:
        parser = argparse.ArgumentParser()
        add_flags(parser, Switch)
        return from_flags(Switch, parser.parse_args(argv)).keep

    assert parse([]) is False and parse(["--keep"]) is True
    monkeypatch.setenv("EXAMPLE_KEEP", "yes")
    assert parse([]) is True and parse(["--no-keep"]) is False
    monkeypatch.setenv("EXAMPLE_KEEP", "maybe")
    with pytest.raises(ValueError, match="maybe"):
        parse([])


def test_help_shows_each_default_and_variable_once() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "A rank. (env EXAMPLE_RANK; default 64)" in text
    assert "A folder. (default here)" in text


def test_the_serve_command_is_made_from_service_config(monkeypatch) -> None:
    """Every ServiceConfig field is a `serve` flag, with the field's default."""
    args = cli.build_parser().parse_args(["serve"])
    assert cli.service_config(args) == ServiceConfig()
    for f in fields(ServiceConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if f.name != "tenants_file":  # derived from data_dir after parsing
            assert getattr(cli.service_config(args), f.name) == default, f.name
    monkeypatch.setenv("FINETUNE_MAX_LORA_RANK", "7")
    with pytest.raises(cli.UsageError, match="max_lora_rank 7"):
        cli.service_config(cli.build_parser().parse_args(["serve"]))


def _literal_defaults(tree: ast.AST) -> list[tuple[str, int, object]]:
    """(name, line, value) of each literal default: function parameters, and dataclass
    fields (``name: T = 3`` or ``field(default=3)``) in classes."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            pairs = list(
                zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True)
            )
            pairs += [
                (arg, d)
                for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                if d is not None
            ]
            out += [(arg.arg, d.lineno, d.value) for arg, d in pairs if isinstance(d, ast.Constant)]
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                value = stmt.value
                if isinstance(value, ast.Call):
                    value = next((k.value for k in value.keywords if k.arg == "default"), None)
                if isinstance(value, ast.Constant):
                    out.append((stmt.target.id, stmt.lineno, value.value))
    return [(n, line, v) for n, line, v in out if v is not None]


def test_no_setting_has_a_default_written_twice() -> None:
    """A config field's default is written on the field alone: no function parameter or
    other dataclass of the service or the server gives the same setting a default of its
    own (the drift issue 21 found: min_examples 10 in one place and 1 in another)."""
    settings = {f.name for cls in SETTINGS for f in fields(cls)}
    seen: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "trainer").rglob("*.py"), *(ROOT / "server").rglob("*.py")]):
        for name, line, value in _literal_defaults(ast.parse(path.read_text())):
            if name in settings:
                seen.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line} = {value!r}")
    twice = {name: where for name, where in seen.items() if len(where) > 1}
    assert not twice, twice
