"""shared_vllm's CUDA IPC path, with a stand-in for vLLM's worker in a second process.

The stand-in (this file run as a script) holds a model's weights on CUDA the way vLLM's
LlamaForCausalLM does (fused qkv_proj and gate_up_proj, a padded embedding that a tied
lm_head shares) and exports them with the project's own `SharedWeightsExporter` methods, on
a stand-in worker object, since those methods need no vLLM on CUDA. The trainer side then
attaches with the project's own `check_export` / `open_tensors` / `alias_model`, exactly as
`SharedWeights.attach` does after its rpc. The stand-in's layout is built by hand from the
Hugging Face weights, so the mapping is checked against an independent construction.

Run with `-m gpu`; skipped without CUDA. The protocol with the stand-in is one JSON line per
request on its stdin and one prefixed JSON line per answer on its stdout.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[1]
PAD_VALUE = 7.0  # in the embedding's padding rows, which the trainer must never see
ANSWER_TIMEOUT_S = 120.0
ANSWER_PREFIX = "@exporter "  # marks protocol lines on the stand-in's stdout


# --------------------------------------------------------------------------------------
# The stand-in exporter process
# --------------------------------------------------------------------------------------

def vllm_layout(hf_state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The tensors vLLM's Llama holds for these Hugging Face weights: q|k|v and gate|up
    concatenated by rows, the embedding padded past the vocabulary (vLLM pads to a
    multiple of 64; one extra block here so a padding row always exists)."""
    vocab, hidden = config.vocab_size, config.hidden_size
    embed = torch.full((vocab // 64 * 64 + 64, hidden), PAD_VALUE)
    embed[:vocab] = hf_state["model.embed_tokens.weight"]
    out = {"model.embed_tokens.weight": embed}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(
            [hf_state[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(
            [hf_state[f"{p}.mlp.gate_proj.weight"], hf_state[f"{p}.mlp.up_proj.weight"]])
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"{p}.{name}"] = hf_state[f"{p}.{name}"]
    out["model.norm.weight"] = hf_state["model.norm.weight"]
    return out


def module_tree(tensors: dict[str, torch.Tensor], tied_lm_head: bool) -> torch.nn.Module:
    """A module whose named parameters are `tensors` (frozen, like vLLM's), with a tied
    `lm_head` holding the embedding's very Parameter, as vLLM ties it."""
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    if tied_lm_head:
        root.add_module("lm_head", torch.nn.Module())
        root.lm_head.register_parameter("weight", root.model.embed_tokens.weight)
    return root


def serve_exporter(model_dir: str, dtype_name: str) -> None:
    """The stand-in worker: export over CUDA IPC, then answer read/write/save requests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from example_trainer.vllm.shared_weights import SharedWeightsExporter

    dtype = getattr(torch, dtype_name)
    config = AutoConfig.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layout = {n: t.to("cuda", dtype) for n, t in vllm_layout(hf.state_dict(), config).items()}
    del hf
    model = module_tree(layout, config.tie_word_embeddings)
    worker = SharedWeightsExporter()
    worker.model_runner = SimpleNamespace(get_model=lambda: model)
    worker.parallel_config = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    worker.model_config = SimpleNamespace(hf_config=config)
    params = dict(model.named_parameters())

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(ANSWER_PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"info": worker.shared_weights_export()})
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "read":  # the extension's own diagnostic read
            answer({"values": worker.shared_weights_read(request["name"], request["indices"])})
        elif op == "write":
            with torch.no_grad():
                params[request["name"]].view(-1)[request["index"]] = request["value"]
            torch.cuda.synchronize()
            answer({"ok": True})
        elif op == "save":
            torch.save({n: p.detach().cpu() for n, p in params.items()}, request["path"])
            answer({"ok": True})
        elif op == "exit":
            answer({"ok": True})
            return


class Exporter:
    """The stand-in as a child process; `ask` sends one request and returns the answer."""

    def __init__(self, model_dir: Path, dtype_name: str, log_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-exporter", str(model_dir), dtype_name],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log_file, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        self.info = self._answer()["info"]

    def _read_lines(self) -> None:
        """Runs in a thread: every stdout line into the queue, then None at EOF (a thread,
        since select() cannot see lines already in the pipe's read buffer)."""
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self) -> dict[str, Any]:
        """The next answer line; other output (a library printing) is skipped."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(ANSWER_PREFIX):
                return json.loads(line[len(ANSWER_PREFIX):])
        self.proc.kill()
        raise AssertionError("the stand-in exporter did not answer; its log:\n"
                             + self.log_path.read_text()[-4000:])

    def ask(self, op: str, **kwargs: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.ask("exit")
            except (AssertionError, BrokenPipeError):
                pass
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# --------------------------------------------------------------------------------------
# The trainer side
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_trainer_params_alias_exporter_memory_over_cuda_ipc(tiny_model_dir, tmp_path,
                                                            dtype_name, tol):
    exporter = Exporter(tiny_model_dir, dtype_name, tmp_path / "exporter.log")
    try:
        check_attached_model(exporter, tiny_model_dir, tmp_path, getattr(torch, dtype_name),
                             tol, torch.device("cuda"))
    finally:  # the checks' frame is gone: the trainer holds no handle on the exporter now
        gc.collect()
        torch.cuda.synchronize()
        code = exporter.close()
    assert code == 0, exporter.log_path.read_text()[-4000:]


def check_attached_model(exporter: Exporter, model_dir: Path, tmp_path: Path,
                         dtype: torch.dtype, tol: float, device: torch.device) -> None:
    """Attach as `SharedWeights.attach` does, then check memory, function, an optimizer
    step and writes in both directions against the exporter's own memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from example_trainer.optim import build_optimizer
    from example_trainer.shared_weights import (alias_model, check_aliased, check_export,
                                                fused_sizes, open_tensors, vllm_source)

    config = AutoConfig.from_pretrained(model_dir)
    info = exporter.info
    assert info["device"] == device.type

    # Attach: no trainer memory for the weights (only the recomputed rotary buffers).
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tensors = open_tensors(check_export([info], device), device)
    model = alias_model(config, tensors)
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weight_bytes > 256 << 10
    assert added <= 16 << 10, f"attaching allocated {added} bytes ({weight_bytes} of weights)"
    params = dict(model.named_parameters())
    assert check_aliased(model, tensors) == len(params)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    exported = {e["name"] for e in info["entries"]}
    assert "model.embed_tokens.weight" in exported and "lm_head.weight" not in exported

    # The same function as the Hugging Face model, then one AdamW step on both.
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    ids = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(0)
                         )[:16].view(2, 8).to(device)  # distinct ids: no atomics in backward
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=tol, atol=tol)
    exporter.ask("save", path=str(tmp_path / "before.pt"))
    for m in (model, ref):
        optimizer = build_optimizer("adamw", m.parameters(), lr=1e-3)  # fused on CUDA
        m(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    check_aliased(model, tensors)  # the step updated the views in place

    # Both sides equal after the step; the exporter's memory moved like the reference.
    exporter.ask("save", path=str(tmp_path / "after.pt"))
    before_step, theirs = (torch.load(tmp_path / f) for f in ("before.pt", "after.pt"))
    for name, ref_param in ref.named_parameters():
        source = vllm_source(name, config)
        served = theirs[source.name][source.start:source.stop]
        assert torch.equal(served, params[name].detach().cpu()), name
        torch.testing.assert_close(served, ref_param.detach().cpu(), rtol=tol, atol=tol,
                                   msg=name)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(theirs[qkv], before_step[qkv])
    assert (theirs["model.embed_tokens.weight"][config.vocab_size:] == PAD_VALUE).all()

    # Writes are visible both ways: one memory, nothing copied.
    hidden, q_rows = config.hidden_size, fused_sizes(config)["qkv_proj"][0]
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[2, 3] = 1.5  # trainer -> exporter
    torch.cuda.synchronize()
    assert exporter.ask("read", name=qkv, indices=[(q_rows + 2) * hidden + 3]
                        )["values"] == [1.5]
    last = config.num_hidden_layers - 1
    exporter.ask("write", name=f"model.layers.{last}.mlp.gate_up_proj.weight",
                 index=(config.intermediate_size + 4) * hidden + 5, value=-2.5)  # up[4, 5]
    exporter.ask("write", name="model.embed_tokens.weight", index=9 * hidden + 1, value=0.75)
    assert float(model.model.layers[last].mlp.up_proj.weight.detach()[4, 5]) == -2.5
    assert float(model.lm_head.weight.detach()[9, 1]) == 0.75  # tied: the same memory


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-exporter"]:
        serve_exporter(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: python {Path(__file__).name} --serve-exporter MODEL_DIR DTYPE")
