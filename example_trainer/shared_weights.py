"""Trainer-side half of `shared_vllm`: a Hugging Face model whose parameters *are* vLLM's.

vLLM's worker extension (`example_trainer/vllm/shared_weights.py`) exports every weight
tensor of the served model; here we open them (one mapped /dev/shm file on CPU, CUDA IPC
handles on GPU) and hand them to `shared_weights_layout.alias_model`, which builds the
Hugging Face model on the meta device (no weight memory) with each parameter a view of
vLLM's tensor (the fused-layout mapping is documented there).
`optimizer.step()` then updates the served model in place; `SharedWeights.pause` /
`publish` bracket it so that no request mixes old and new weights, and on CPU `repack`
re-packs vLLM's GEMM copies.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

# The layout names are re-exported: this stays the module callers and tests import.
from .shared_weights_layout import (FUSED, SUPPORTED_ARCHITECTURES,  # noqa: F401
                                    VOCAB_PARAMS, SharedWeightsError, Source, alias_model,
                                    check_aliased, check_architecture, fused_sizes,
                                    tied_embeddings, vllm_source)
from .vllm.client import VLLMClient, VLLMError
from .vllm.shared_weights import HEADER, machine_identity, process_memory

log = logging.getLogger(__name__)

EXTENSION = "example_trainer.vllm.shared_weights.SharedWeightsExporter"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IPC_TYPES = {"torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
             "torch.storage.TypedStorage": torch.storage.TypedStorage,
             "torch.storage.UntypedStorage": torch.UntypedStorage,
             "torch.UntypedStorage": torch.UntypedStorage}


# --------------------------------------------------------------------------------------
# Checks and opening vLLM's tensors
# --------------------------------------------------------------------------------------

def check_export(results: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The one worker's export, after checking tensor parallelism, machine and device."""
    if len(results) != 1 or any(r.get("tensor_parallel_size", 1) != 1
                                or r.get("pipeline_parallel_size", 1) != 1 for r in results):
        sizes = [(r.get("tensor_parallel_size"), r.get("pipeline_parallel_size"))
                 for r in results]
        raise SharedWeightsError(
            f"shared_vllm needs vLLM with tensor and pipeline parallel size 1 (one worker "
            f"holding whole tensors); this server has {len(results)} workers with (tp, pp) "
            f"{sizes}. Restart it with --tensor-parallel-size 1, or use lora_nccl")
    info = results[0]
    mine = machine_identity()
    if (info.get("boot_id"), info.get("hostname")) != (mine["boot_id"], mine["hostname"]):
        raise SharedWeightsError(
            f"vLLM runs on another machine ({info.get('hostname')!r}, boot id "
            f"{info.get('boot_id')!r}) than the trainer ({mine['hostname']!r}, "
            f"{mine['boot_id']!r}): shared_vllm maps vLLM's memory, so both must run on one "
            "machine. Use --mode lora_nccl or legacy across machines")
    if info["device"] != device.type:
        raise SharedWeightsError(
            f"vLLM holds its weights on {info['device']} but the trainer runs on "
            f"{device.type}: shared_vllm needs both on the same device (--device "
            f"{info['device']})")
    return info


def open_tensors(info: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Name -> a tensor over vLLM's memory for every exported weight."""
    if info["device"] == "cuda":
        return _open_cuda(info, device)
    path = info["path"]
    if not os.path.exists(path) or os.path.getsize(path) != info["nbytes"]:
        raise SharedWeightsError(
            f"cannot open vLLM's shared weight file {path} ({info['nbytes']} bytes): vLLM and "
            "the trainer must share one machine and one /dev/shm (not separate containers)")
    buffer = torch.from_file(path, shared=True, size=info["nbytes"], dtype=torch.uint8)
    token = bytes(buffer[:HEADER].tolist()).rstrip(b"\0").decode(errors="replace")
    if token != info["token"]:
        raise SharedWeightsError(f"{path} is not the file vLLM exported (token mismatch): "
                                 "is /dev/shm shared between vLLM and the trainer?")
    out = {}
    for entry in info["entries"]:
        dtype = DTYPES[entry["dtype"]]
        span = 1 + sum((n - 1) * s for n, s in zip(entry["shape"], entry["stride"]))
        size = span * torch.empty((), dtype=dtype).element_size()
        flat = buffer[entry["offset"]:entry["offset"] + size].view(dtype)
        out[entry["name"]] = flat.as_strided(entry["shape"], entry["stride"])
    return out


def _open_cuda(info: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Rebuild each tensor from its CUDA IPC handle on our index of vLLM's GPU.

    Untested in CI (no GPU there): written against torch's `rebuild_cuda_tensor`."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    uuids = [str(torch.cuda.get_device_properties(i).uuid)
             for i in range(torch.cuda.device_count())]
    if info["device_uuid"] not in uuids:
        raise SharedWeightsError(f"vLLM's GPU {info['device_uuid']} is not visible to the "
                                 "trainer (check CUDA_VISIBLE_DEVICES)")
    index = uuids.index(info["device_uuid"])
    if device.index is not None and device.index != index:
        raise SharedWeightsError(f"the trainer runs on cuda:{device.index} but vLLM's "
                                 f"weights are on cuda:{index}: use --device cuda:{index}")
    out = {}
    for entry in info["entries"]:
        args = [_decode_ipc_arg(a) for a in entry["ipc_args"]]
        args[6] = index  # storage_device: our number for vLLM's GPU
        out[entry["name"]] = rebuild_cuda_tensor(*args)
    return out


def _decode_ipc_arg(arg: Any) -> Any:
    if isinstance(arg, dict) and "bytes" in arg:
        return base64.b64decode(arg["bytes"])
    if isinstance(arg, dict) and "dtype" in arg:
        return DTYPES[arg["dtype"]]
    if isinstance(arg, dict) and "type" in arg:
        return IPC_TYPES[arg["type"]]
    if isinstance(arg, list):
        return tuple(arg)
    return arg


# --------------------------------------------------------------------------------------
# The trainer's handle on vLLM's weights
# --------------------------------------------------------------------------------------

class SharedWeights:
    """vLLM's weights seen as a Hugging Face model, and the calls around each update.

    `attach` checks the requirements, opens vLLM's tensors and builds `model`; `load` is
    the `TrainingRun.setup` hook that hands it over; `pause` before and `repack` + `resume`
    (`publish`) after every optimizer step; `close` resumes a server left paused."""

    def __init__(self, client: VLLMClient, model_path: str, model: torch.nn.Module,
                 tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self.client, self.model_path, self.model = client, model_path, model
        self.tensors, self.info = tensors, info
        self.paused = False
        self.stats: dict[str, float] = {}

    @classmethod
    def attach(cls, client: VLLMClient, model_path: str | Path,
               device: torch.device) -> "SharedWeights":
        """Export vLLM's weights (one rpc), check, open and alias them."""
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_path)
        check_architecture(config)  # before asking vLLM to move anything
        t0 = time.perf_counter()
        try:
            results = client.collective_rpc("shared_weights_export")
        except VLLMError as err:
            raise SharedWeightsError(_export_failure(client, err)) from err
        try:
            info = check_export(results, device)
            tensors = open_tensors(info, device)
        finally:  # both sides have it mapped (or we failed): leave nothing in /dev/shm
            if results and results[0].get("path"):
                client.collective_rpc("shared_weights_release")
        if info["architectures"] and info["architectures"][0] != config.architectures[0]:
            raise SharedWeightsError(f"vLLM serves a {info['architectures'][0]}, but "
                                     f"{model_path} is a {config.architectures[0]}")
        model = alias_model(config, tensors)
        count = check_aliased(model, tensors)
        log.info("trainer aliases vLLM's weights: %d parameters in %d vLLM tensors (%s, %s), "
                 "attached in %.2f s", count, len(tensors), info["device"],
                 str(next(model.parameters()).dtype).removeprefix("torch."),
                 time.perf_counter() - t0)
        return cls(client, str(model_path), model, tensors, info)

    @classmethod
    def deferred(cls, client: VLLMClient, model_path: str | Path) -> "SharedWeights":
        """Attach when `load` runs (in `TrainingRun.setup`), so that a failure to attach
        stops the server the run was handed, like any other set-up failure."""
        return cls(client, str(model_path), None, {}, {})  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def load(self, cfg: Any, *, resume_from: str | Path | None = None
             ) -> tuple[torch.nn.Module, Any]:
        """`TrainingRun.setup`'s model loader: the aliased model and the tokenizer. On
        resume the checkpoint's weights are copied into vLLM's memory in place."""
        from .model import load_tokenizer, resolve_device
        if self.model is None:
            attached = self.attach(self.client, self.model_path, resolve_device(cfg))
            self.model, self.tensors, self.info = attached.model, attached.tensors, attached.info
        if cfg.dtype not in ("auto", str(self.dtype).removeprefix("torch.")):
            raise SharedWeightsError(f"--dtype {cfg.dtype}: shared_vllm trains in the dtype "
                                     f"vLLM serves ({self.dtype}); pass --dtype auto")
        if resume_from:
            self._restore(resume_from)
        if cfg.grad_checkpointing:
            from .model import enable_grad_checkpointing
            enable_grad_checkpointing(self.model)
        return self.model, load_tokenizer(self.model_path)

    @torch.no_grad()
    def _restore(self, checkpoint: str | Path) -> None:
        from transformers import AutoModelForCausalLM
        saved = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=self.dtype)
        self.pause()
        try:
            self.model.load_state_dict(saved.state_dict())  # copy_ into the aliases
        finally:
            self.publish()
        check_aliased(self.model, self.tensors)
        log.info("restored the weights of %s into vLLM's memory", checkpoint)

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """Generation stops for the block (running requests finish on the old weights), then
        vLLM-CPU re-packs and resumes. A block cut short leaves the server paused until
        `close`, which finishes the publish."""
        self.pause()
        yield
        self.publish()

    def pause(self) -> None:
        """Stop generation and let running requests finish on the old weights (`wait`)."""
        t0 = time.perf_counter()
        self.client.pause("wait")
        self.paused = True
        self.stats["sync/pause_s"] = time.perf_counter() - t0

    def repack(self) -> None:
        """After the update, while paused: re-pack vLLM-CPU's GEMM copies (a no-op on CUDA)
        and drop the prefix cache, whose blocks hold KV computed with the old weights."""
        t0 = time.perf_counter()
        [repack] = self.client.collective_rpc("shared_weights_repack")
        if not self.client.reset_prefix_cache():
            raise SharedWeightsError("vLLM did not reset its prefix cache after the update "
                                     "(blocks still held by running requests)")
        self.stats |= {"sync/repack_s": repack["repack_s"],
                       "sync/repack_rpc_s": time.perf_counter() - t0}

    def resume(self) -> None:
        t0 = time.perf_counter()
        self.client.resume()
        self.paused = False
        self.stats["sync/resume_s"] = time.perf_counter() - t0

    def publish(self) -> None:
        """`repack` then `resume`: vLLM serves the new weights."""
        self.repack()
        self.resume()

    def pop_stats(self) -> dict[str, float]:
        """Timings of the last pause/publish, plus both processes' resident memory."""
        stats, self.stats = self.stats, {}
        return stats | {f"mem/trainer_{k}": v for k, v in process_memory().items()} | {
            f"mem/vllm_{k}": v for k, v in self.vllm_memory().items()}

    def vllm_memory(self) -> dict[str, float]:
        [memory] = self.client.collective_rpc("shared_weights_memory")
        return memory

    def close(self) -> None:
        """If an update was cut short (an error or a signal between `pause` and `resume`),
        finish publishing it: a user's server outlives the trainer and must neither stay
        paused nor serve half-packed weights."""
        if not self.paused:
            return
        try:
            self.repack()
            self.resume()
        except VLLMError as err:
            log.warning("could not re-pack and resume vLLM: %s", err)


def _export_failure(client: VLLMClient, err: VLLMError) -> str:
    """Explain why `/collective_rpc shared_weights_export` failed, with the fix."""
    start = ("start vLLM with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
             f"{EXTENSION}")
    if err.status_code == 404:
        return f"vLLM at {client.url} has no /collective_rpc (not in dev mode): {start}"
    if "shared_weights_export" in (err.text or str(err)):
        return (f"vLLM at {client.url} does not have the shared-weights worker extension: "
                f"{start}. ({str(err)[:300]})")
    return f"vLLM at {client.url} failed to export its weights: {err}"


def vllm_options(cfg: Any) -> dict[str, Any]:
    """How vLLM must run for shared_vllm: the exporting worker extension, in the trainer's
    dtype when one is given (by default vLLM's own choice, which the trainer then adopts)."""
    return {"worker_extension_cls": EXTENSION} | (
        {} if cfg.dtype == "auto" else {"dtype": cfg.dtype})
