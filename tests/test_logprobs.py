"""example_trainer.logprobs: the chunked, checkpointed sampled-token log-probs against the
naive full-logits reference, values and gradients, plain and with a LoRA adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from example_trainer.logprobs import naive_token_logprobs, sampled_token_logprobs


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


VOCAB = 128


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,  # != VOCAB, so saved [*, VOCAB] tensors mean logits
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,  # larger than default so log-probs are far from uniform
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).float().eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0  # right padding on the second sequence
    temps = torch.tensor([1.0, 0.7])
    return ids, attn, temps


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_naive(model):
    ids, attn, temps = _batch()
    w = torch.randn(2, 15, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    naive = naive_token_logprobs(model, ids, attn, temps)
    (naive * w).sum().backward()
    g_naive = _grads(model)
    model.zero_grad()
    chunked = sampled_token_logprobs(model, ids, attn, temps, chunk_size=7)  # 30 positions
    (chunked * w).sum().backward()
    g_chunked = _grads(model)

    assert chunked.shape == (2, 15)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=0)
    assert g_naive.keys() == g_chunked.keys() and len(g_naive) > 0
    for name in g_naive:
        torch.testing.assert_close(g_chunked[name], g_naive[name], atol=1e-5, rtol=1e-4)
    # position t is log p(ids[t+1] | ids[:t+1]): check one entry straight from the logits
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        direct = torch.log_softmax(logits[1, 4] / 0.7, -1)[ids[1, 5]]
    _close(chunked[1, 4].detach(), direct, atol=1e-5)
    return chunked.detach(), logits


def test_sampled_logprobs_match_naive_on_llama():
    model = _tiny_llama()
    lp, logits = _check_against_naive(model)
    # non-trivial outputs: temperature matters and values are far from uniform -ln(128)
    ids, attn, _ = _batch()
    lp_t1 = sampled_token_logprobs(model, ids, attn, torch.tensor([1.0, 1.0])).detach()
    assert (lp_t1[1] - lp[1]).abs().max() > 1e-2
    assert lp.std() > 0.1

    # entropy of the tempered distribution, and the no-grad path gives the same values
    temps = torch.tensor([1.0, 0.7])
    with torch.no_grad():
        out, ent = sampled_token_logprobs(
            model, ids, attn, temps, chunk_size=4, return_entropy=True
        )
        logp = torch.log_softmax(logits[:, :-1] / temps.view(2, 1, 1), -1)
        want = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want, atol=1e-5, rtol=0)
    _, ent_g = sampled_token_logprobs(model, ids, attn, temps, chunk_size=4, return_entropy=True)
    assert not ent_g.requires_grad


def test_sampled_logprobs_do_not_save_full_logits():
    # Record every tensor autograd saves for backward outside checkpointed regions. The
    # naive path saves [B, T, V]-shaped tensors; the chunked one must save none with V.
    model = _tiny_llama()
    ids, attn, temps = _batch()

    def saved_vocab_tensors(fn):
        seen = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == VOCAB:
                seen.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(model, ids, attn, temps)
        return seen

    assert saved_vocab_tensors(naive_token_logprobs)  # the probe sees logits
    assert saved_vocab_tensors(
        lambda *a: sampled_token_logprobs(*a, chunk_size=7)
    ) == []


def test_sampled_logprobs_match_naive_on_peft_lora():
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    ids, attn, temps = _batch()
    with torch.no_grad():
        base_lp = sampled_token_logprobs(base, ids, attn, temps)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
    )
    model = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # peft initialises lora_B to 0: make the adapter matter
    lp, _ = _check_against_naive(model)
    assert (lp - base_lp).abs().max() > 1e-2
    # only adapter weights train, and they did get gradients
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_sampled_logprobs_argument_checks():
    model = _tiny_llama()
    ids, attn, _ = _batch()
    with pytest.raises(ValueError):
        sampled_token_logprobs(model, ids, attn, torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        sampled_token_logprobs(model, ids, attn, chunk_size=0)
    # default temperature is 1.0
    with torch.no_grad():
        a = sampled_token_logprobs(model, ids, attn)
        b = naive_token_logprobs(model, ids, attn, torch.ones(2))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_positions_limit_the_head_to_the_loss_positions():
    """With `positions` (the loss mask) the wanted log-probs, entropies and the gradient of
    any loss over them equal the unrestricted ones; the rest come back as exactly 0."""
    model = _tiny_llama()
    ids, attn, temps = _batch()
    mask = torch.zeros(2, 15)
    mask[0, 5:11] = 1
    mask[1, 2:4] = 1
    w = torch.randn(2, 15, generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    full, full_ent = sampled_token_logprobs(model, ids, attn, temps, chunk_size=5,
                                            return_entropy=True)
    (full * w * mask).sum().backward()
    g_full = _grads(model)
    model.zero_grad()
    part, part_ent = sampled_token_logprobs(model, ids, attn, temps, chunk_size=5,
                                            return_entropy=True, positions=mask)
    (part * w * mask).sum().backward()
    g_part = _grads(model)

    on = mask.bool()
    torch.testing.assert_close(part[on], full[on], atol=1e-6, rtol=0)
    torch.testing.assert_close(part_ent[on], full_ent[on], atol=1e-6, rtol=0)
    assert (part[~on] == 0).all() and (part_ent[~on] == 0).all()
    for name in g_full:
        torch.testing.assert_close(g_part[name], g_full[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="positions must be"):
        sampled_token_logprobs(model, ids, attn, temps, positions=mask[:, :-1])
