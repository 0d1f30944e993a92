"""Load the policy model and tokenizer, optionally wrapped with a LoRA adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_MODEL, TrainConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch sees no CUDA device")
    return torch.device(cfg.device)


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


def resolve_model_path(name: str) -> str:
    """A local directory, the embedded default (prepared on first use), or a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == DEFAULT_MODEL:
        from .embedded import prepare_default_model
        return str(prepare_default_model())
    return name


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def wrap_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules),
                      layers_to_transform=list(cfg.lora_layers) or None, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing gives gradients to parameters inside a checkpointed layer
    even when the layer's inputs do not require grad (frozen embeddings under LoRA), so
    adapters train without an input hook (peft adds one anyway when it wraps a model that
    has checkpointing on; harmless). Works before or after LoRA wrapping.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(cfg: TrainConfig, *, resume_from: str | Path | None = None
               ) -> tuple[torch.nn.Module, Any]:
    """Model on the configured device and dtype; LoRA modes get a trainable adapter.

    On resume a full model loads its weights from the checkpoint; a LoRA model loads the base
    from `cfg.model` and the adapter from the checkpoint.
    """
    from transformers import AutoModelForCausalLM
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    base_path = resolve_model_path(cfg.model)
    weights = str(resume_from) if resume_from and not cfg.is_lora else base_path
    try:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"could not load model {weights!r}: {err}. Pass --model with "
                                "a local directory (no model hub is reachable here?)") from err
    tokenizer = load_tokenizer(base_path)
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    if cfg.is_lora:
        if resume_from:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        else:
            model = wrap_lora(model, cfg)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("loaded %s on %s (%s): %.1fM trainable parameters", weights, device,
             str(dtype).removeprefix("torch."), trainable / 1e6)
    return model, tokenizer
