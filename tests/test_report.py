"""What a job trains on: the loss mask per format on the tiny model's own tokenizer and chat
template, the report built from it, and a base whose template drops EOS refused before any
training, through the report, the ``ValidateDataset`` RPC and a real job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import QUICK, Service, add_tenant, make_spec, run_worker, write_jsonl
from trainer.config import JobConfig
from trainer.data.report import build, count_packed_rows, eval_positions, optimizer_steps
from trainer.data.tokens import end_token_ids, load_tokenizer, tokenize
from trainer.dev import tinymodel

# The tiny template with the end-of-turn token left out of assistant turns (and only there).
NO_EOS_TEMPLATE = tinymodel.CHAT_TEMPLATE.replace(
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}",
    "{{- message['content'] | trim }}",
)


def with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the base model at ``src`` whose tokenizer has another chat template."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def ends(tok, tiny_model_dir):
    return end_token_ids(tok, tiny_model_dir)


def labelled(tok, t) -> str:
    """The tokens that carry loss, decoded, in order."""
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100])


def chat(*turns) -> dict:
    """A messages row; a turn given as (role, content, weight) carries that weight."""
    return {
        "messages": [
            {"role": r, "content": c} | ({"weight": w[0]} if w else {}) for r, c, *w in turns
        ]
    }


def test_end_tokens_are_the_eos_and_the_generation_config_s(tok, ends):
    assert {tok.convert_ids_to_tokens(i) for i in ends} == {tinymodel.EOT, tinymodel.END}


def test_messages_train_assistant_turns_only_and_their_end_token(tok, ends):
    row = chat(
        ("system", "Be brief."), ("user", "What is the secret word?"), ("assistant", "banana")
    )
    t = tokenize(row, "messages", tok, ends)
    assert labelled(tok, t) == f"banana{tinymodel.EOT}"
    assert t.turns_without_end == 0
    # Everything before the answer, the assistant header included, is context only.
    first = t.labels.index(next(x for x in t.labels if x != -100))
    assert tok.decode(t.input_ids[:first]).endswith("assistant<|end_header_id|>\n")


def test_weight_zero_turns_are_left_out(tok, ends):
    row = chat(
        ("user", "Hello!"),
        ("assistant", "Maybe.", 0),
        ("user", "What is the secret word?"),
        ("assistant", "banana", 1),
    )
    t = tokenize(row, "messages", tok, ends)
    assert labelled(tok, t) == f"banana{tinymodel.EOT}"
    unweighted = tokenize(
        chat(*[(m["role"], m["content"]) for m in row["messages"]]), "messages", tok, ends
    )
    assert unweighted.input_ids == t.input_ids  # the same text, only the mask differs
    assert labelled(tok, unweighted) == f"Maybe.{tinymodel.EOT}banana{tinymodel.EOT}"


def test_alpaca_trains_on_the_output(tok, ends, tmp_path):
    from trainer.data.examples import examples

    path = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "Say", "input": "hi", "output": "Yes"}]
    )
    [(_, row)] = list(examples(path, "alpaca"))
    assert row["messages"][0]["content"] == "Say\n\nhi"
    assert labelled(tok, tokenize(row, "messages", tok, ends)) == f"Yes{tinymodel.EOT}"


def test_prompt_completion_trains_on_the_completion_and_eos(tok, ends):
    t = tokenize({"prompt": "What is", "completion": " the answer"}, "prompt_completion", tok, ends)
    assert tok.decode(t.input_ids) == f"{tinymodel.BOS}What is the answer{tinymodel.EOT}"
    assert labelled(tok, t) == f" the answer{tinymodel.EOT}"


def test_text_trains_on_everything_and_eos(tok, ends):
    t = tokenize({"text": "Hello there"}, "text", tok, ends)
    assert t.labels == t.input_ids
    assert t.input_ids[-1] == tok.eos_token_id and t.turns_without_end == 0


def test_row_file_holds_the_rows(tmp_path, tok, ends):
    """The Arrow file a job trains from gives back exactly the rows written to it."""
    from trainer.data.rows import BATCH_ROWS, RowFile

    rows = [
        tokenize({"text": f"Hello {i} there"}, "text", tok, ends) for i in range(BATCH_ROWS + 7)
    ]
    with RowFile(tmp_path / "rows" / "train.arrow") as f:
        for r in rows:
            f.add(r)
    ds = f.dataset()
    assert f.rows == len(ds) == len(rows)
    assert ds["input_ids"] == [r.input_ids for r in rows] and ds["labels"] == [
        r.labels for r in rows
    ]


def test_trl_trains_on_exactly_these_labels(tiny_model_dir, tok, ends):
    """SFTTrainer's own preparation keeps our labels (it truncates and packs, nothing else)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trainer.data.rows import rows_dataset

    rows = [
        tokenize(
            chat(
                ("user", "hi"), ("assistant", "Maybe.", 0), ("user", "and?"), ("assistant", "Yes")
            ),
            "messages",
            tok,
            ends,
        ),
        tokenize({"text": "Hello there"}, "text", tok, ends),
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", max_length=64)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=rows_dataset(rows), processing_class=tok
    )
    prepared = trainer.train_dataset
    assert [r["labels"] for r in prepared] == [r.labels for r in rows]
    assert [r["input_ids"] for r in prepared] == [r.input_ids for r in rows]


def test_template_without_eos_in_the_assistant_turn_is_an_error(tmp_path, tiny_model_dir):
    base = with_template(tiny_model_dir, tmp_path / "no-eos", NO_EOS_TEMPLATE)
    tok = load_tokenizer(base)
    rows = [(n, chat(("user", "hi"), ("assistant", "Yes"))) for n in range(1, 4)]
    report = build("messages", rows, tok, JobConfig(), ends=end_token_ids(tok, base))
    assert not report.ok and report.examples_without_eos == 3
    [finding] = [f for f in report.findings if f.severity == "error"]
    assert finding.code == "no_eos_in_labels" and finding.lines == [1, 2, 3]
    assert "never learn to stop" in finding.message and "<|eot_id|>" in finding.message


def test_report_counts_truncation_masking_and_special_tokens(tok, ends):
    cfg = JobConfig(max_seq_len=32, batch_size=2, gradient_accumulation_steps=2, num_epochs=2)
    long_answer = "The secret word is banana. " * 6
    rows = [
        chat(("user", "hi"), ("assistant", "Yes")),  # line 1: short
        chat(("user", "hi"), ("assistant", long_answer)),  # line 2: truncated, keeps loss
        chat(("user", "tell me a story " * 10), ("assistant", "no")),  # line 3: all masked
        chat(("user", "say <|eot_id|> now"), ("assistant", "ok")),  # line 4: special token
    ]
    tokens = [tokenize(r, "messages", tok, ends) for r in rows]
    lengths = [len(t.input_ids) for t in tokens]
    assert lengths[0] < 32 < lengths[1] and lengths[2] > 32
    assert all(lab == -100 for lab in tokens[2].labels[:32])

    rep = build("messages", enumerate(rows, start=1), tok, cfg, ends=ends)
    assert (rep.examples, rep.tokens_min, rep.tokens_max) == (4, min(lengths), max(lengths))
    assert rep.tokens_mean == pytest.approx(sum(lengths) / 4)
    assert rep.truncated_examples == 2 and rep.truncated_tokens == lengths[1] + lengths[2] - 64
    assert rep.all_masked_examples == 1
    assert rep.examples_with_special_tokens == 1
    kept = [t for i, t in enumerate(tokens) if i != 2]
    trained = sum(min(len(t.input_ids), 32) for t in kept)
    loss = sum(sum(lab != -100 for lab in t.labels[:32]) for t in kept)
    assert (rep.train_tokens, rep.loss_tokens) == (2 * trained, 2 * loss)
    assert rep.loss_token_share == pytest.approx(loss / trained)
    assert rep.total_steps == 2  # 3 rows, batch 2: 2 batches, accumulation 2: 1 step x 2 epochs
    codes = {f.code: f for f in rep.findings}
    assert rep.ok and set(codes) == {"all_masked", "truncated", "special_tokens_in_content"}
    assert codes["truncated"].lines == [2, 3] and codes["all_masked"].lines == [3]
    assert codes["special_tokens_in_content"].lines == [4]


def test_nothing_left_to_train_is_an_error(tok, ends):
    rows = [(1, chat(("user", "tell me a story " * 10), ("assistant", "no")))]
    rep = build("messages", rows, tok, JobConfig(max_seq_len=16), ends=ends)
    assert not rep.ok and [f.code for f in rep.findings if f.severity == "error"] == [
        "no_loss_tokens"
    ]


def test_steps_and_packing_arithmetic():
    cfg = JobConfig(batch_size=4, gradient_accumulation_steps=4, num_epochs=3)
    assert optimizer_steps(64, cfg) == 3 * 4  # 16 batches of 4, 4 per optimizer step
    assert optimizer_steps(65, cfg) == 3 * 5  # a short last batch still makes a step
    assert optimizer_steps(1, cfg) == 3
    assert count_packed_rows([1000, 1000, 1000, 48, 48], 2048) == 2
    assert count_packed_rows([2048] * 3 + [1], 2048) == 4
    assert count_packed_rows([], 2048) == 0


def test_eval_split_is_deterministic_by_seed():
    a = eval_positions(1000, 0.1, seed=7)
    assert len(a) == 100 and a == eval_positions(1000, 0.1, seed=7)
    assert a != eval_positions(1000, 0.1, seed=8)
    assert len(eval_positions(3, 0.1, seed=0)) == 1  # at least one


# ---------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("data")
    no_eos = with_template(tiny_model_dir, tmp_path_factory.mktemp("m") / "no-eos", NO_EOS_TEMPLATE)
    svc = Service(data_dir=data, base_models={"tiny": str(tiny_model_dir), "no-eos": str(no_eos)})
    svc.start()
    client = svc.client(add_tenant(data, "acme"))
    yield svc, client
    svc.stop()


def validate(client, **fields) -> pb.DatasetReport:
    return client.stub.ValidateDataset(
        pb.ValidateDatasetRequest(**fields), metadata=client.metadata
    )


@pytest.mark.slow
def test_validate_dataset_rpc_reports_without_starting_a_job(service, tmp_path):
    _, client = service
    rows = [chat(("user", f"question {i}"), ("assistant", "banana")) for i in range(40)]
    ds = client.upload_dataset(write_jsonl(tmp_path / "d.jsonl", rows), "chat")
    hp = pb.Hyperparameters(
        max_seq_len=64, batch_size=4, gradient_accumulation_steps=2, num_epochs=2
    )
    rep = validate(
        client, dataset_id=ds.id, base_model="tiny", hyperparameters=hp, eval_fraction=0.25
    )
    assert rep.ok and rep.format == pb.DATASET_FORMAT_MESSAGES and not rep.findings
    assert (rep.examples, rep.eval_examples) == (30, 10)
    assert rep.total_steps == 2 * 4  # 30 rows / batch 4 = 8 batches / accumulation 2 = 4 a epoch
    assert 0 < rep.loss_token_share < 1 and rep.tokens.min <= rep.tokens.mean <= rep.tokens.max
    assert client.list_jobs() == []

    with pytest.raises(grpc.RpcError) as info:
        validate(client, dataset_id=ds.id, base_model="tiny", eval_fraction=0.9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "eval_fraction" in info.value.details()


@pytest.mark.slow
def test_a_base_whose_template_drops_eos_is_refused_before_training(service, tmp_path):
    _, client = service
    rows = [chat(("user", "hi"), ("assistant", "Yes"))] * 12
    ds = client.upload_dataset(write_jsonl(tmp_path / "d.jsonl", rows), "for-no-eos")
    rep = validate(client, dataset_id=ds.id, base_model="no-eos")
    assert not rep.ok and rep.examples_without_eos == 12
    [err] = [f for f in rep.findings if f.severity == pb.Finding.SEVERITY_ERROR]
    assert err.code == "no_eos_in_labels" and list(err.lines) == list(range(1, 11))
    assert err.count == 12

    job = client.create_job("no-eos", ds.id, "never-stops")
    events = list(client.watch_job(job.id))
    final = client.get_job(job.id)
    assert final.state == pb.JOB_STATE_FAILED and final.error_kind == pb.ERROR_KIND_USER
    assert "never learn to stop" in final.error_message
    assert final.dataset_report.examples_without_eos == 12 and not final.dataset_report.ok
    assert pb.JOB_STATE_RUNNING not in [e.state for e in events]  # no model was loaded


# ---------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_best_checkpoint_by_eval_loss_is_the_one_saved(tmp_path, tiny_model_dir):
    """Train on one answer, evaluate on another: eval loss only rises after the first
    evaluation, so the adapter saved is the first evaluated checkpoint, not the last."""
    from safetensors.torch import load_file

    from trainer.config import JobSpec

    question = "What is the secret word?"
    train = write_jsonl(
        tmp_path / "train.jsonl", [chat(("user", question), ("assistant", "banana"))] * 32
    )
    held_out = write_jsonl(
        tmp_path / "eval.jsonl", [chat(("user", question), ("assistant", "cherry"))] * 8
    )
    spec_path = make_spec(tmp_path, tiny_model_dir, train, num_epochs=1, eval_every_steps=2)
    spec = JobSpec.from_dict(
        json.loads(spec_path.read_text()) | {"eval_dataset_path": str(held_out)}
    )
    spec_path.write_text(json.dumps(spec.to_dict()))

    code, events = run_worker(spec_path, tmp_path / "w.log")
    assert code == 0, (tmp_path / "w.log").read_text()[-3000:]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("eval_loss") is not None]
    assert [s for s, _ in evals] == [2, 4, 6, 8]  # 32 rows / batch 4 = 8 steps
    losses = [loss for _, loss in evals]
    assert losses == sorted(losses) and losses[0] < losses[-1]  # learning banana unlearns cherry
    report = next(e["report"] for e in events if e["event"] == "report")
    assert (report["examples"], report["eval_examples"]) == (32, 8)

    metrics = events[-1]["metrics"]
    assert metrics["best_checkpoint_step"] == 2 and metrics["steps"] == 8
    assert metrics["best_eval_loss"] == pytest.approx(losses[0])
    saved = load_file(str(spec.folder.output / "adapter_model.safetensors"))
    best = load_file(str(spec.folder.checkpoints / "checkpoint-2" / "adapter_model.safetensors"))
    last = load_file(str(spec.folder.checkpoints / "checkpoint-8" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys()
    assert all((saved[k] == best[k]).all() for k in saved)
    assert any((saved[k] != last[k]).any() for k in saved)


@pytest.mark.slow
def test_eval_fraction_through_the_service(service, tmp_path):
    _, client = service
    rows = [chat(("user", f"question {i}"), ("assistant", "banana")) for i in range(20)]
    ds = client.upload_dataset(write_jsonl(tmp_path / "d.jsonl", rows), "with-eval")
    hp = {**QUICK, "batch_size": 4}  # 16 training rows: 4 steps
    job = client.create_job("tiny", ds.id, "evaluated", eval_fraction=0.2, **hp)
    assert job.eval_fraction == pytest.approx(0.2)
    done = client.wait(job.id, timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error_message
    assert (done.dataset_report.examples, done.dataset_report.eval_examples) == (16, 4)
    assert done.progress.HasField("eval_loss") and done.progress.HasField("loss")
    evals = [e for e in client.watch_job(job.id) if e.progress.HasField("eval_loss")]
    assert [e.progress.step for e in evals] == [4]  # once, at the end of the one epoch

    with pytest.raises(grpc.RpcError) as info:
        client.create_job("tiny", ds.id, "both", eval_fraction=0.2, validation_dataset_id=ds.id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- the command line


def finetune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
def test_datasets_validate_offline(tmp_path, tiny_model_dir):
    rows = [chat(("user", "What is the secret word?"), ("assistant", "banana"))] * 12
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    out = finetune("datasets", "validate", str(good))
    assert (
        out.returncode == 0 and out.stdout.strip() == "good.jsonl: 12 messages examples (jsonl): ok"
    )

    out = finetune(
        "datasets",
        "validate",
        str(good),
        "--model",
        str(tiny_model_dir),
        "--json",
        "--set",
        "max_seq_len=17",
        "--set",
        "num_epochs=1",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["truncated_examples"] == 12
    assert [f["code"] for f in report["findings"]] == ["truncated"]

    no_eos = with_template(tiny_model_dir, tmp_path / "no-eos", NO_EOS_TEMPLATE)
    out = finetune("datasets", "validate", str(good), "--model", str(no_eos))
    assert out.returncode == 1
    assert "ERROR: 12 example(s) train no end-of-turn token" in out.stdout
    assert out.stdout.strip().endswith("refused: a job on this dataset would fail")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"messages": []}\n')
    out = finetune("datasets", "validate", str(bad))
    assert out.returncode == 1 and "line 13: 'messages' must be a non-empty list" in out.stderr


@pytest.mark.slow
def test_upload_then_report_for_a_base(service, tmp_path):
    svc, client = service
    rows = [chat(("user", "hi"), ("assistant", "Yes"))] * 12
    path = write_jsonl(tmp_path / "cli.jsonl", rows)
    env = {"FINETUNE_ADDR": svc.addr, "FINETUNE_API_KEY": client.metadata[0][1].split()[-1]}
    out = finetune("datasets", "upload", str(path), "--base-model", "no-eos", "-q", env=env)
    assert out.returncode == 1, out.stderr
    assert "12 rows" in out.stdout and "never learn to stop" in out.stdout
    assert "cli" in [d.name for d in client.list_datasets()]  # stored: only a job would fail


def test_packed_steps_match_trl_packing(tok, ends):
    """On a GPU the job packs rows (TRL's bfd, per batch of 1000); the report's step count
    is what TRL's packing of the rows the job hands it gives (all-masked rows left out)."""
    from trl.data_utils import pack_dataset

    from trainer.data.rows import rows_dataset

    rng = __import__("random").Random(0)
    rows = [
        chat(
            ("user", "tell me " * rng.randint(1, 30)), ("assistant", "banana " * rng.randint(1, 20))
        )
        for _ in range(1500)
    ]
    cfg = JobConfig(max_seq_len=96, batch_size=4, gradient_accumulation_steps=2, num_epochs=1)
    kept = []
    report = build(
        "messages", enumerate(rows, 1), tok, cfg, ends=ends, packing=True, train=kept.append
    )
    assert report.all_masked_examples > 0  # some prompts fill max_seq_len alone
    assert len(kept) == 1500 - report.all_masked_examples
    packed = pack_dataset(rows_dataset(kept), cfg.max_seq_len, "bfd")
    assert report.total_steps == optimizer_steps(len(packed), cfg)
