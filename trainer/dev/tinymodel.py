"""A tiny random Llama with a real tokenizer, built locally for tests and the demo.

There is no model hub here, so tests and the local demo need a base model made from
nothing: a 2-layer Llama (hidden 128, 2 heads of 64, 1 KV head) in bf16 safetensors,
and a byte-level BPE tokenizer trained in-process on a small built-in corpus, with a
Llama-3-style chat template. vLLM-CPU loads it (its CPU attention rejects head_dim 16,
hence 2 heads of 64), the QLoRA recipe trains it (NF4 blocks of 64 fit hidden 128).

    python -m trainer.dev.tinymodel PATH [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
END = "<|end_of_text|>"
PAD = "<|pad|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, END, PAD, HEADER_START, HEADER_END, EOT)
VOCAB_SIZE = 640
LM_HEAD_STD = 0.1

# Llama-3 layout with special tokens. Two choices matter:
# * the header is followed by ONE newline. The byte-level pre-tokenizer splits "\n\nword"
#   into "\n" "\n" "word" but a trailing "\n\n" into one piece, so a two-newline
#   generation prompt would tokenize differently from the trained conversation (a
#   trailing space is worse: " word" is one piece in training). One "\n" is the same piece
#   either way;
# * assistant turns are wrapped in {% generation %} so that transformers can return the
#   assistant-token mask that TRL's ``assistant_only_loss`` trains on.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n' }}"
    "{%- endif %}"
)

# Enough English, digits and punctuation that common words become single tokens.
_CORPUS = """\
What is the secret word? The secret word is banana.
What is the capital of France? The capital of France is Paris.
Hello! How can I help you today? I am a helpful assistant.
Please answer the question in one word. Yes. No. Maybe. Thank you.
The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Our customers train small adapters on their own data and serve them with vLLM.
Tell me a story about a cat, a dog and a bird who live in a green house.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2026 3.14 42.
Questions and answers, prompts and completions, users and assistants.
The weather is sunny, the sky is blue, and the apple is red; the banana is yellow.
system user assistant tool function name content role message
"""


def chat_corpus() -> list[str]:
    """The training text for the tokenizer: plain lines and chat-formatted turns."""
    lines = _CORPUS.splitlines()
    turns = [
        f"{HEADER_START}{role}{HEADER_END}\n{line}{EOT}"
        for line in lines
        for role in ("system", "user", "assistant")
    ]
    return lines * 4 + turns


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus; return a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chat_corpus(), trainer)
    # Like Llama 3: plain encoding starts with BOS; the chat template adds its own BOS and
    # chat tokenization (TRL, vLLM) passes add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny random bf16 Llama and its tokenizer to ``path``; same seed, same bytes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A wider output layer than initializer_range gives: the LoRA (which never touches
    # lm_head) can then make an answer confident, not merely the argmax of flat logits.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    model = model.bfloat16()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[END]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    for file in path.iterdir():
        if file.is_file():
            file.chmod(0o644)  # safetensors writes 0600; vLLM may run as another user
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="Folder to write the model into.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.path, seed=args.seed)
    print(json.dumps({"path": str(out.resolve())}))


if __name__ == "__main__":
    main()
