"""Merged export (``trainer.training.merge``): real PEFT adapters on the tiny Llama, merged
into bf16, float32 and sharded bases; the merged folder loads with transformers and gives
the logits of base + adapter; refusals leave nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.errors import FailedPrecondition, InvalidArgument
from trainer.training.merge import (
    AdapterMismatch,
    ExportExists,
    UnsupportedAdapter,
    merge_adapter,
    parse_size,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES = 7 * 2  # seven projections in each of the tiny model's two layers
PROMPTS = ["What is the secret word?", "The quick brown fox jumps over the lazy dog."]
ADAPTER_TEMPLATE = "{{ 'adapter template' }}"  # marks the tokenizer the adapter saved


def _load(path: Path, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _inputs(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return dict(tok(PROMPTS, return_tensors="pt", padding=True))


def _assert_close_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within bf16 tolerance: a bf16 forward of the tiny model (PEFT's or the merged one)
    misses the float32 logits by about 1% of the largest (measured 0.033-0.047 of 4-4.5)."""
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@torch.no_grad()
def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs).logits.float()
    return out[inputs["attention_mask"].bool()]  # padding positions say nothing


def _small_b(model: PeftModel) -> PeftModel:
    """Random B (``init_lora_weights=False``) but, like a trained one, small next to the base
    weights: kaiming B would swamp them and every forward with them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    return model


def _save_adapter(base: Path, folder: Path, tokenizer: bool = True, **lora) -> Path:
    """A real PEFT LoRA on ``base`` with random (non-zero) A and B, saved as the recipe does."""
    torch.manual_seed(1)
    model = _load(base)
    cfg = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS, **lora},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    _small_b(get_peft_model(model, cfg)).save_pretrained(folder)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(base)
        tok.chat_template = ADAPTER_TEMPLATE
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model_dir: Path) -> dict[str, Path]:
    """The tiny model as one bf16 file, in float32 (values bf16 cannot hold), and in
    bf16 shards with an index."""
    tmp = tmp_path_factory.mktemp("bases")
    f32 = _load(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in f32.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    f32.save_pretrained(tmp / "f32")
    sharded = _load(tiny_model_dir, torch.bfloat16)
    sharded.save_pretrained(tmp / "sharded", max_shard_size="100KB")
    for name in ("f32", "sharded"):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(tiny_model_dir / f, tmp / name / f)
    assert (tmp / "sharded" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp / "f32" / "config.json").read_text())["dtype"] == "float32"
    return {"bf16": tiny_model_dir, "f32": tmp / "f32", "sharded": tmp / "sharded"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir: Path) -> Path:
    return _save_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "v0001")


def _assert_export(out: Path, result, base: Path, max_shard: int) -> None:
    """The folder is a whole bf16 Hugging Face model: shards and index agree."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert result.shards == len(shards) and sorted(set(index["weight_map"].values())) == shards
    assert result.total_bytes == sum(p.stat().st_size for p in out.iterdir())
    base_keys = set()
    for f in base.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            base_keys |= set(h.keys())
    assert set(index["weight_map"]) == base_keys
    data = 0
    for name in shards:
        with safe_open(str(out / name), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        assert {index["weight_map"][k] for k in tensors} == {name}
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        size = sum(t.numel() * 2 for t in tensors.values())
        assert size <= max_shard or len(tensors) == 1
        data += size
    assert index["metadata"]["total_size"] == data
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".merging-" in p.name]


@pytest.mark.parametrize("kind", ["bf16", "f32", "sharded"])
def test_merged_model_gives_the_logits_of_base_plus_adapter(
    kind: str, bases: dict[str, Path], adapter: Path, tmp_path: Path
) -> None:
    base = bases[kind]
    out = tmp_path / "export"
    out.mkdir()  # an empty folder is taken over
    limit = 100_000 if kind == "sharded" else 5 * 10**9
    result = merge_adapter(base, adapter, out, max_shard_size=limit)
    assert result.path == out and result.merged_modules == MODULES
    _assert_export(out, result, base, limit)

    inputs = _inputs(out)
    merged = _load(out, dtype="auto")
    assert merged.dtype == torch.bfloat16
    got = _logits(merged, inputs)
    # The truth: PEFT's forward (base + scaling * B A x) in float32 on this base.
    reference = PeftModel.from_pretrained(_load(base), adapter)
    want = _logits(reference, inputs)
    with reference.disable_adapter():
        plain = _logits(reference, inputs)
    assert (want - plain).abs().max() > 0.5  # the adapter matters, so the checks below bite
    _assert_close_logits(got, want)
    _assert_weights_are_peft_merge(out, reference)
    # And PEFT's merge on the base loaded in bf16, as a user would do it.
    peft_merged = PeftModel.from_pretrained(_load(base, torch.bfloat16), adapter).merge_and_unload()
    _assert_close_logits(got, _logits(peft_merged, inputs))

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == ADAPTER_TEMPLATE  # the adapter's tokenizer won over the base's
    assert tok("banana")["input_ids"] == AutoTokenizer.from_pretrained(base)("banana")["input_ids"]


def _assert_weights_are_peft_merge(out: Path, reference: PeftModel) -> None:
    """Every exported tensor is PEFT's own merge in float32, rounded to bf16 once."""
    exact = reference.merge_and_unload().state_dict()
    for key, tensor in load_file_dir(out).items():
        torch.testing.assert_close(tensor, exact[key].bfloat16(), msg=key)


def load_file_dir(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_rslora_and_rank_and_alpha_patterns(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = _save_adapter(
        tiny_model_dir,
        tmp_path / "adapter",
        tokenizer=False,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 40},
    )
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["rank_pattern"] and saved["alpha_pattern"]
    result = merge_adapter(tiny_model_dir, adapter, tmp_path / "export")
    assert result.merged_modules == MODULES

    inputs = _inputs(tiny_model_dir)
    reference = PeftModel.from_pretrained(_load(tiny_model_dir), adapter)
    _assert_close_logits(
        _logits(_load(tmp_path / "export", "auto"), inputs), _logits(reference, inputs)
    )
    _assert_weights_are_peft_merge(tmp_path / "export", reference)
    # Without a tokenizer in the adapter the base's is copied.
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores its projections (in, out): the delta is added transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model = _load(tmp_path / "gpt2")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, init_lora_weights=False)  # fmt: skip
    _small_b(get_peft_model(model, lora)).save_pretrained(tmp_path / "adapter")

    result = merge_adapter(tmp_path / "gpt2", tmp_path / "adapter", tmp_path / "export")
    assert result.merged_modules == 2 * 3 + 2  # c_attn, attn c_proj, c_fc, mlp c_proj
    ids = {"input_ids": torch.tensor([[1, 5, 9, 33, 2]]), "attention_mask": torch.ones(1, 5)}
    reference = PeftModel.from_pretrained(_load(tmp_path / "gpt2"), tmp_path / "adapter")
    want = _logits(reference, ids)
    with reference.disable_adapter():
        assert not torch.allclose(_logits(reference, ids), want, atol=1e-3)
    _assert_close_logits(_logits(_load(tmp_path / "export", "auto"), ids), want)
    _assert_weights_are_peft_merge(tmp_path / "export", reference)


# ---------------------------------------------------------------- refusals


def _copy_adapter(adapter: Path, to: Path) -> Path:
    shutil.copytree(adapter, to)
    return to


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_adapter_of_another_shape_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(other), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "exports" / "export"
    with pytest.raises(
        AdapterMismatch,
        match=r"down_proj.lora_A.weight \[8, 128\].*do not fit.*down_proj.weight \[128, 256\]",
    ):
        merge_adapter(tiny_model_dir, tmp_path / "adapter", out)
    _assert_nothing_left(out)


def test_lora_weight_without_a_base_weight_is_named(
    adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = _copy_adapter(adapter, tmp_path / "adapter")
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for ab in "AB":
        moved = key.replace("lora_A", f"lora_{ab}")
        tensors[moved.replace("layers.0", "layers.7")] = tensors.pop(moved)
    save_file(tensors, broken / "adapter_model.safetensors")
    out = tmp_path / "export"
    with pytest.raises(AdapterMismatch, match=re.escape(key.replace("layers.0", "layers.7"))):
        merge_adapter(tiny_model_dir, broken, out)
    _assert_nothing_left(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "changed the base weights"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_unsupported_adapters_are_refused(
    change: dict, message: str, adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = _copy_adapter(adapter, tmp_path / "adapter")
    cfg = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    out = tmp_path / "export"
    with pytest.raises(UnsupportedAdapter, match=message):
        merge_adapter(tiny_model_dir, broken, out)
    _assert_nothing_left(out)


def test_dora_tensors_without_the_flag_are_refused(
    adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = _copy_adapter(adapter, tmp_path / "adapter")
    tensors = load_file(broken / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.ones(256)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapter, match=r"lora_magnitude_vector.*DoRA"):
        merge_adapter(tiny_model_dir, broken, tmp_path / "export")
    _assert_nothing_left(tmp_path / "export")


def test_existing_output_is_left_alone(adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportExists, match="not an empty folder"):
        merge_adapter(tiny_model_dir, adapter, out)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing(
    adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 5:
            raise OSError("disk gone")

    out = tmp_path / "export"
    with pytest.raises(OSError, match="disk gone"):
        merge_adapter(tiny_model_dir, adapter, out, max_shard_size="200KB", progress=progress)
    _assert_nothing_left(out)
    assert list(tmp_path.iterdir()) == []
    assert calls[0][0] < calls[-1][0] < calls[-1][1]


def test_errors_are_domain_errors(adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert issubclass(AdapterMismatch, FailedPrecondition)
    with pytest.raises(InvalidArgument, match="max_shard_size"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "x", max_shard_size="lots")
    with pytest.raises(InvalidArgument, match="device"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "x", device="nonsense")
    (tmp_path / "config.json").write_text("{}")  # a base folder without weights
    with pytest.raises(FailedPrecondition, match=r"has neither model\.safetensors"):
        merge_adapter(tmp_path, adapter, tmp_path / "x")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    _assert_nothing_left(tmp_path / "x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merge_on_the_gpu_matches_the_cpu(adapter: Path, tiny_model_dir: Path, tmp_path: Path):
    merge_adapter(tiny_model_dir, adapter, tmp_path / "cpu")
    merge_adapter(tiny_model_dir, adapter, tmp_path / "gpu", device="cuda")
    cpu, gpu = load_file_dir(tmp_path / "cpu"), load_file_dir(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], msg=key)
