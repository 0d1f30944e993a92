"""The in-place half of the `example_gloo` weight-transfer engine (gloo_engine.py): load
received tensors straight into vLLM's served parameters and re-pack each CPU layer once.

vLLM-CPU multiplies from packed copies and empties each linear's `weight` after packing, so
`InPlaceUpdate` first gives every such linear its weight tensor back (rebuilt from vLLM's own
reload metadata, weight loader included), counts what the model's weight loaders write, and
runs a layer's `process_weights_after_loading` (the re-pack) as soon as its weight is
complete; `finish` re-packs what is left and fails if a weight was not fully loaded.
`in_place_blockers` says when a model needs more than a re-pack (quantized layers, MLA, a
model-level hook): the engine then uses vLLM's layerwise reload instead. Runs inside vLLM's
worker: imports only torch and vLLM.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _repack_only_methods() -> tuple[type, ...]:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    return UnquantizedLinearMethod, UnquantizedEmbeddingMethod


def in_place_blockers(model: torch.nn.Module) -> list[str]:
    """Why `model` cannot be loaded in place (empty: it can). In place is exact only when
    every layer's post-load processing is a re-pack of its own weight: unquantized linear
    and embedding methods (exact types, not subclasses), no MLA attention (it decompresses
    weights after loading), no model-level post-load hook."""
    from vllm.model_executor.layers.attention import MLAAttention
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    allowed = _repack_only_methods()
    blockers = []
    if hasattr(model, "process_weights_after_loading"):
        blockers.append(f"{type(model).__name__} has a model-level post-load hook")
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase) and type(method) not in allowed:
            blockers.append(f"{name}: {type(method).__name__}")
        elif isinstance(module, MLAAttention):
            blockers.append(f"{name}: MLAAttention")
    return blockers


def _layers_to_reprocess(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every linear and LM head (their packed copies, or on GPU nothing, follow the
    weight). The input embedding is left out: it looks rows up in `weight` directly."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    return [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]


class InPlaceUpdate:
    """One in-place update of a vLLM model. At the start, every layer whose weight vLLM-CPU
    emptied after packing gets an (uninitialized) weight of its load-time shape, class and
    attributes back, from the metadata vLLM records for reloading, its weight loader wrapped
    to count the elements it copies; the LM heads keep their weight (a tied one is the
    embedding's), whose loader is wrapped to count too until the update ends. A layer is
    re-packed (its own `process_weights_after_loading`, as vLLM's loader runs it) as soon
    as all of its weight is loaded, between two buckets, so the re-pack overlaps the
    transfer; that also empties a linear's weight again. The finish re-packs what is left
    (e.g. an embedding padded beyond the checkpoint's rows never counts full). A rebuilt
    weight not fully
    loaded by the finish is an error: re-packing it would serve uninitialized memory. On
    GPU nothing is rebuilt and the re-pack is a no-op."""

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
        self.names = {id(m): n for n, m in model.named_modules()}
        # [loaded, expected] elements per layer: rebuilt weights, then kept ones
        self.pending: dict[torch.nn.Module, list[int]] = {}
        self.kept: dict[torch.nn.Module, list[int]] = {}
        self.wrapped: dict[torch.nn.Module, tuple[torch.Tensor, Any]] = {}  # to unwrap
        for layer in _layers_to_reprocess(model):
            weight = getattr(layer, "weight", None)
            if weight is None:
                continue
            if weight.numel():  # kept: count through the served weight's own loader
                original = _unwrapped(getattr(weight, "weight_loader", None))
                if original is None:
                    self.kept[layer] = [0, -1]  # never full: re-packed at the finish
                    continue
                count = [0, int(getattr(weight, "weight_loader_numel", weight.numel()))]
                weight.weight_loader = _counting(original, count)
                self.wrapped[layer] = (weight, original)
                self.kept[layer] = count
                continue
            info = get_layerwise_info(layer)
            meta = info.restore_metadata[0].get("weight")
            if meta is None or not meta.numel():
                raise RuntimeError(f"{self.names[id(layer)]} has an empty weight and no "
                                   "reload metadata to restore it from")
            with info.restore_device:
                weight = restore_layer_refs(materialize_meta_tensor(meta), layer)
            count = [0, int(getattr(weight, "weight_loader_numel", weight.numel()))]
            weight.weight_loader = _counting(_unwrapped(weight.weight_loader), count)
            setattr(layer, "weight", weight)
            self.pending[layer] = count

    def repack_complete(self) -> None:
        """Re-pack every layer whose weight is now fully loaded."""
        for layers in (self.pending, self.kept):
            done = [layer for layer, (got, want) in layers.items() if 0 <= want <= got]
            for layer in done:
                del layers[layer]
                self._unwrap(layer)
            reprocess(done)

    def finish(self) -> None:
        """Re-pack what is left; fail if a rebuilt weight was not loaded in full."""
        try:
            self.repack_complete()
            if self.pending:
                layer, (got, want) = next(iter(self.pending.items()))
                raise RuntimeError(f"the update did not load {len(self.pending)} rebuilt "
                                   f"weights in full (e.g. {self.names[id(layer)]}.weight: "
                                   f"{got} of {want} elements); they keep their old packed "
                                   "copies")
            reprocess(list(self.kept))
        finally:
            self.release()

    def release(self) -> None:
        """Give the kept weights their own loaders back (also after a failed update)."""
        for layer in list(self.wrapped):
            self._unwrap(layer)

    def _unwrap(self, layer: torch.nn.Module) -> None:
        if layer in self.wrapped:
            weight, original = self.wrapped.pop(layer)
            weight.weight_loader = original


def _unwrapped(loader: Any) -> Any:
    """The layer's own weight loader. A layerwise reload leaves its deferring wrapper on
    the recorded metadata (measured: after one, in-place loads through it did nothing),
    so peel it off as vLLM's `_get_original_loader` does; and our counting wrapper, if an
    update failed before giving a loader back."""
    while getattr(loader, "__name__", "") in ("online_process_loader", COUNTING):
        loader = loader.__wrapped__
    return loader


COUNTING = "example_gloo_counting_loader"


def _counting(loader: Any, count: list[int]) -> Any:
    """`loader`, adding the elements each call copies into the parameter to `count[0]`
    (vLLM's own copy counter, capped at the parameter's size per call, as its layerwise
    reload counts)."""
    from vllm.model_executor.model_loader.reload.meta import CopyCounter

    def load(*args: Any, **kwargs: Any) -> Any:
        with CopyCounter() as counter:
            out = loader(*args, **kwargs)
        count[0] += min(counter.copied_numel, max(count[1], 0))
        return out
    load.__name__, load.__wrapped__ = COUNTING, loader  # type: ignore[attr-defined]
    return load


@torch.no_grad()
def reprocess(layers: list[torch.nn.Module]) -> None:
    """Run each layer's own post-load processing (vLLM-CPU: re-pack the weight, then empty
    a linear's `weight` again), as vLLM's loader does after a load."""
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
        if hasattr(layer, "update_param_tp_status"):
            layer.update_param_tp_status()


def repack_tied_lm_head(model: torch.nn.Module) -> int:
    """Re-pack every CPU lm_head that shares its weight with an input embedding (vLLM-CPU
    multiplies from a packed copy made at load time); returns how many were re-packed."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                     VocabParallelEmbedding)
    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if type(m) is VocabParallelEmbedding and m.weight.numel()}
    count = 0
    for module in model.modules():
        if (isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear")
                and module.weight.data_ptr() in embeddings):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            count += 1
    return count
