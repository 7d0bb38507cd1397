"""A random Llama whose tokenizer names every id, for the serving benchmark.

A random 8B model's greedy answers may be any of its 128,256 ids; a real tokenizer of that
size is not available offline, and a smaller one leaves ids that vLLM cannot detokenize.
So the tokenizer here is word-level: the Llama-3 special tokens of ``trainer.dev.tinymodel``
(same chat template), a few words, then ``w<i>`` for every remaining id. A chat example of
``n`` tokens is then easy to write exactly, which makes packed rows exactly full.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from trainer.dev.tinymodel import BOS, CHAT_TEMPLATE, END, EOT, PAD, SPECIAL_TOKENS

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)
TINY = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
WORDS = ["<unk>", "user", "assistant", "system"]
# Tokens of a chat example around its two contents: BOS, two headers of 3, two EOTs.
CHAT_OVERHEAD = 9


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = [*SPECIAL_TOKENS, *WORDS]
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, names.index(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        unk_token="<unk>",
        model_max_length=8192,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(path: Path, smoke: bool) -> Path:
    """Write the random bf16 Llama (8B shape, or tiny with ``smoke``) and its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    t0 = time.time()
    tok = build_tokenizer((TINY if smoke else LLAMA_8B)["vocab_size"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        **(TINY if smoke else LLAMA_8B),
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cpu" if smoke else "cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[END]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(path, max_shard_size="5GB")
    tok.save_pretrained(path)
    del model
    if not smoke:
        torch.cuda.empty_cache()
    for f in path.iterdir():
        f.chmod(0o644)
    print(f"built {path} in {time.time() - t0:.0f}s", flush=True)
    return path


def word_ids(model_dir: Path) -> tuple[int, int, int]:
    """(the first ``w<i>`` id, the vocabulary size, BOS's id) of a model built here."""
    cfg = json.loads((model_dir / "config.json").read_text())
    return len(SPECIAL_TOKENS) + len(WORDS), cfg["vocab_size"], cfg["bos_token_id"]


def chat_rows(model_dir: Path, n: int, length: int, seed: int) -> list[dict]:
    """``n`` chat examples of exactly ``length`` tokens: random user words, one fixed answer."""
    first, vocab, _ = word_ids(model_dir)
    rng = random.Random(seed)
    answer_len = max(4, (length - CHAT_OVERHEAD) // 5)
    user_len = length - CHAT_OVERHEAD - answer_len
    answer = " ".join(f"w{i}" for i in range(1, answer_len + 1))
    rows = []
    for _ in range(n):
        user = " ".join(f"w{rng.randrange(vocab - first)}" for _ in range(user_len))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows
