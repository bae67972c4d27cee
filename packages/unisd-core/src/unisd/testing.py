"""Helpers for tests (ours and plugin authors'): tiny models and tokenizers built offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 12 + 34? Reply with only the number. 46",
    "Rewrite 'apple river' in capital letters. APPLE RIVER",
    "def add(a, b):\n    return a + b\n",
    "Answer: A. Reasoning: because the sky is blue.",
    "This is an example for a response to the question:",
    "Carefully study the reference solution, then solve the problem below with your own approach.",
]


def make_tokenizer(pad_is_eos: bool = True, chat_template: bool = True) -> Any:
    """A small byte-level BPE tokenizer with ChatML specials (trained in milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>", unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(tokenizer: Any, arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0) -> Any:
    """A random causal LM of the given architecture ("llama" or "qwen2") sized for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny_model_dir(path: str | Path, arch: str = "llama", pad_is_eos: bool = True, **kwargs: Any) -> Path:
    """Save a tiny random model and its tokenizer as a Hugging Face directory."""
    path = Path(path)
    tokenizer = make_tokenizer(pad_is_eos=pad_is_eos)
    model = make_tiny_model(tokenizer, arch=arch, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def toy_records(n: int = 8) -> list[dict[str, Any]]:
    """Training records in the ``--data`` JSONL format."""
    return [
        {"id": f"toy-{i}", "prompt": f"What is {10 + i} + {20 + i}? Reply with only the number.",
         "reference": str(30 + 2 * i), "meta": {"i": i}}
        for i in range(n)
    ]
