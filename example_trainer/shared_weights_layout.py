"""The layout half of `shared_vllm`: where each Hugging Face parameter lives among vLLM's
tensors, and the HF model built from views of them.

Pure functions of the model config and the opened tensors (no vLLM, no server calls), so
they are tested without vLLM; `example_trainer/shared_weights.py` opens the tensors and
drives the server. vLLM fuses some projections, so a view may be a block of rows of a fused
tensor:

    HF (Llama / Qwen2)                     vLLM
    layers.i.self_attn.{q,k,v}_proj        layers.i.self_attn.qkv_proj   rows [q | k | v]
    layers.i.mlp.{gate,up}_proj            layers.i.mlp.gate_up_proj     rows [gate | up]
    model.embed_tokens, lm_head            the same, rows [0, vocab) (vLLM pads the vocab)
    lm_head when tied                      model.embed_tokens (one Parameter for both)

Row blocks of a contiguous tensor are contiguous, which matters: fused AdamW wrote the wrong
memory for non-contiguous CPU views (docs/shared-weights.md, "Pitfalls"), so every alias
is checked. Buffers vLLM does not hold (rotary frequencies) are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# HF module -> (vLLM's fused module, index of its block of rows)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


class SharedWeightsError(ConfigError):
    """A requirement of shared_vllm is not met (vLLM's set-up, machine, device, model); the
    message says which and what to do. A ConfigError, so the CLI prints one clear line."""


# --------------------------------------------------------------------------------------
# The mapping (pure functions of the model config)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Rows [start, stop) along dim 0 of vLLM parameter `name` (stop None: all rows)."""
    name: str
    start: int = 0
    stop: int | None = None


def check_architecture(config: Any) -> None:
    """Refuse models whose fused layout this mapping does not know."""
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SharedWeightsError(
            f"shared_vllm does not know how vLLM lays out the weights of {arch}: it maps "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only. Use --mode lora_nccl or legacy, or "
            "extend example_trainer.shared_weights_layout.vllm_source for this architecture")


def fused_sizes(config: Any) -> dict[str, list[int]]:
    """Rows of each block in vLLM's fused tensors: qkv_proj = [q, k, v], gate_up_proj =
    [gate, up] (grouped-query attention makes k and v narrower than q)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"qkv_proj": [q, kv, kv], "gate_up_proj": [config.intermediate_size] * 2}


def tied_embeddings(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def vllm_source(hf_name: str, config: Any) -> Source:
    """Where the Hugging Face parameter `hf_name` lives among vLLM's parameters."""
    if hf_name == "lm_head.weight" and tied_embeddings(config):
        hf_name = "model.embed_tokens.weight"
    if hf_name in VOCAB_PARAMS:
        return Source(hf_name, 0, config.vocab_size)
    prefix, _, leaf = hf_name.rpartition(".")  # leaf: weight or bias
    parent, _, module = prefix.rpartition(".")
    if module in FUSED:
        fused, index = FUSED[module]
        sizes = fused_sizes(config)[fused]
        start = sum(sizes[:index])
        return Source(f"{parent}.{fused}.{leaf}", start, start + sizes[index])
    return Source(hf_name)

# --------------------------------------------------------------------------------------
# The aliased model
# --------------------------------------------------------------------------------------

def alias_model(config: Any, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The Hugging Face model for `config` with every parameter a view of `tensors`."""
    from transformers import AutoModelForCausalLM
    check_architecture(config)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise SharedWeightsError(f"vLLM's weights mix dtypes {dtypes}")
    dtype = dtypes.pop()
    device = next(iter(tensors.values())).device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    aliases: dict[Source, torch.nn.Parameter] = {}  # tied names get the same Parameter
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            source = vllm_source(name, config)
            if source not in aliases:
                aliases[source] = torch.nn.Parameter(_view(name, source, tensors, param))
            module._parameters[leaf] = aliases[source]
    _recompute_buffers(model, device)
    model.config.use_cache = False
    return model


def _view(name: str, source: Source, tensors: dict[str, torch.Tensor],
          meta: torch.Tensor) -> torch.Tensor:
    if source.name not in tensors:
        raise SharedWeightsError(f"{name} should live in vLLM's {source.name}, which vLLM "
                                 f"does not export (it has e.g. {sorted(tensors)[:4]})")
    view = tensors[source.name][source.start:source.stop]
    if view.shape != meta.shape:
        raise SharedWeightsError(f"{name}: vLLM's {source.name}[{source.start}:{source.stop}] "
                                 f"has shape {tuple(view.shape)}, the model expects "
                                 f"{tuple(meta.shape)}")
    if not view.is_contiguous():  # fused optimizers mis-write non-contiguous views
        raise SharedWeightsError(f"{name} would alias a non-contiguous view of vLLM's "
                                 f"{source.name}")
    return view


def _recompute_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers vLLM does not hold are rebuilt: the rotary embedding's frequencies."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if not name.endswith("rotary_emb"):
            raise SharedWeightsError(f"don't know how to recompute the buffers of {name} "
                                     f"({type(module).__name__})")
        parent_name, _, leaf = name.rpartition(".")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def check_aliased(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Every parameter must lie inside vLLM's memory and be contiguous; returns the count.

    A `.to()`, `.half()` or re-initialisation would have silently copied a parameter."""
    spans = [(t.untyped_storage().data_ptr(),
              t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in tensors.values()]
    count = 0
    for name, param in model.named_parameters():
        inside = any(lo <= param.data_ptr() < hi for lo, hi in spans)
        if not inside or not param.is_contiguous():
            raise SharedWeightsError(f"{name} no longer aliases vLLM's weights "
                                     f"(inside={inside}, contiguous={param.is_contiguous()})")
        count += 1
    return count
