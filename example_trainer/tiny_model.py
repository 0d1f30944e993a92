"""Build a tiny random chat model offline, for tests and quick experiments.

No model hub is reachable on CI machines, so tests make their own model in seconds: a
byte-level BPE tokenizer trained on generated arithmetic text, a ChatML chat template and a
2-layer Llama with tied embeddings (like SmolLM2, so the tied-lm_head paths get exercised).
Head size 32 is one vLLM's CPU attention supports.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"<|im_start|>user\nWhat is {a}{op}{b}? Answer with just the number."
                     f"<|im_end|>\n<|im_start|>assistant\nThe answer is \\boxed{{{eval(f'{a}{op}{b}')}}}"
                     "<|im_end|>\n")
    return lines


def build_tiny_model(out_dir: str | Path, *, vocab_size: int = 512, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> Path:
    """Write a random Llama chat model with its tokenizer to `out_dir` and return the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(2000, seed), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     unk_token=None)
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.05,
        bos_token_id=None, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.save_pretrained(out)
    log.info("built tiny model (%d parameters) in %s", model.num_parameters(), out)
    return out
