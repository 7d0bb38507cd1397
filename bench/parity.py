"""What trains is what serves: a served adapter's greedy tokens and top logprobs against
PEFT's forward on the same bf16 base with the same adapter folder.

* ``served`` asks vLLM (the official ``openai`` client, a completion per prompt given as
  token ids, greedy, ``logprobs=top``, tokens returned as ids);
* ``reference`` runs the base through transformers with the adapter through PEFT,
  teacher-forced on the same prompt and the tokens vLLM chose, once with the adapter and
  once without it;
* ``compare`` checks each position: vLLM's token is PEFT's argmax, or within ``tol`` nats
  of it (two near-equal logits may swap under bf16 rounding); every logprob vLLM reports in
  its top list is within ``tol + rel * |logprob|`` of PEFT's for that token (bf16 logits
  carry 8 significant bits: a logit of 12 is rounded to 1/16, so an unlikely token's
  logprob moves with its size). It also measures how far the adapter moves the logprobs
  from the base's, so a passing check is known to involve it.

Used by ``tests/server/test_server_gpu.py`` and ``bench/serving_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOLERANCE = 0.1  # nats
RELATIVE = 0.02  # of |logprob|


def served(
    url: str, key: str, model: str, prompts: list[list[int]], max_tokens: int, top: int = 5
) -> list[dict[str, Any]]:
    """vLLM's greedy continuation of each prompt with its top-``top`` logprobs."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    out = []
    for ids in prompts:
        choice = client.completions.create(
            model=model,
            prompt=ids,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=top,
            extra_body={"return_tokens_as_token_ids": True},
        ).choices[0]
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.top_logprobs is not None
        out.append(
            {
                "prompt": list(ids),
                "tokens": [int(t.split(":", 1)[1]) for t in lp.tokens],
                "top": [
                    {int(t.split(":", 1)[1]): v for t, v in d.items()} for d in lp.top_logprobs
                ],
            }
        )
    return out


def reference(base_dir: Path, adapter_dir: Path, samples: list[dict[str, Any]], device: str):
    """PEFT's log-softmax at each generated position: (with the adapter, without it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.bfloat16, device_map={"": device}
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with_adapter, without = [], []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["prompt"] + s["tokens"]], device=device)
            first = len(s["prompt"]) - 1  # the logits that predict the first generated token
            last = first + len(s["tokens"])
            logits = model(input_ids=ids).logits[0, first:last].float()
            with_adapter.append(torch.log_softmax(logits, -1).cpu())
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0, first:last].float()
            without.append(torch.log_softmax(logits, -1).cpu())
    del model, base
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return with_adapter, without


def compare(
    samples: list[dict[str, Any]],
    peft_lp: list,
    base_lp: list,
    tol: float = TOLERANCE,
    rel: float = RELATIVE,
) -> dict[str, Any]:
    """The parity report; ``passed`` when every position is within the tolerance."""
    positions = exact = near = 0
    max_diff = worst = 0.0
    diffs: list[float] = []
    adapter_effect = 0.0
    for s, lp, blp in zip(samples, peft_lp, base_lp, strict=True):
        for j, (token, top) in enumerate(zip(s["tokens"], s["top"], strict=True)):
            positions += 1
            row = lp[j]
            best = int(row.argmax())
            if token == best:
                exact += 1
            elif float(row[best] - row[token]) <= tol:
                near += 1
            for t, v in top.items():
                d = abs(float(v) - float(row[t]))
                diffs.append(d)
                max_diff = max(max_diff, d)
                worst = max(worst, d / (tol + rel * abs(float(row[t]))))
            adapter_effect = max(adapter_effect, float((row - blp[j]).abs().max()))
    diffs.sort()
    return {
        "tolerance": f"{tol} nats + {rel} x |logprob|",
        "positions": positions,
        "greedy_exact": exact,
        "greedy_within_tolerance": near,
        "greedy_mismatched": positions - exact - near,
        "top_logprob_max_abs_diff": round(max_diff, 4),
        "top_logprob_p50_abs_diff": round(diffs[len(diffs) // 2], 4) if diffs else None,
        "worst_diff_over_tolerance": round(worst, 3),
        "adapter_effect_max_nats": round(adapter_effect, 3),
        "passed": positions > 0 and exact + near == positions and worst <= 1.0,
    }
