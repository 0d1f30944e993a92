"""shared_vllm's moving parts without vLLM: the fused-layout mapping, the shared-file layout,
the aliased model and the up-front checks. The vLLM-layout tensors here are assembled by
hand from a real Hugging Face model (q|k|v and gate|up concatenated, vocab padded), the way
vLLM holds them, so the mapping is checked against an independent construction."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from example_trainer.config import ConfigError, TrainConfig
from example_trainer.shared_weights import (SharedWeightsError, Source, _decode_ipc_arg,
                                            alias_model, check_aliased, check_architecture,
                                            check_export, fused_sizes, open_tensors,
                                            vllm_source)
from example_trainer.vllm.shared_weights import (HEADER, aligned_layout, encode_ipc_arg,
                                                 machine_identity)


def test_aligned_layout_by_hand():
    # header 64; 10 B at 64 -> next free 74 -> 128; 64 B at 128 -> 192; 1 B at 192 -> 193
    # -> 256; 100 B at 256 -> 356, file rounded up to 384.
    assert aligned_layout([10, 64, 1, 100]) == ([64, 128, 192, 256], 384)
    assert aligned_layout([]) == ([], 64)
    assert aligned_layout([8, 8], align=16, header=0) == ([0, 16], 32)


def test_fused_sizes_with_grouped_query_attention():
    # SmolLM2-135M: 9 query heads and 3 key/value heads of 64, MLP 1536.
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536)
    assert fused_sizes(config) == {"qkv_proj": [576, 192, 192], "gate_up_proj": [1536, 1536]}


def test_vllm_source_by_hand():
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=500, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    qkv, gate_up = f"{attn}.qkv_proj.weight", f"{mlp}.gate_up_proj.weight"
    # q: 4 heads of 32 = 128 rows, k and v: 2 heads of 32 = 64 rows each.
    assert vllm_source(f"{attn}.q_proj.weight", config) == Source(qkv, 0, 128)
    assert vllm_source(f"{attn}.k_proj.weight", config) == Source(qkv, 128, 192)
    assert vllm_source(f"{attn}.v_proj.weight", config) == Source(qkv, 192, 256)
    assert vllm_source(f"{attn}.o_proj.weight", config) == Source(f"{attn}.o_proj.weight")
    assert vllm_source(f"{mlp}.gate_proj.weight", config) == Source(gate_up, 0, 256)
    assert vllm_source(f"{mlp}.up_proj.weight", config) == Source(gate_up, 256, 512)
    assert vllm_source(f"{mlp}.down_proj.weight", config) == Source(f"{mlp}.down_proj.weight")
    assert vllm_source("model.norm.weight", config) == Source("model.norm.weight")
    embed = Source("model.embed_tokens.weight", 0, 500)  # vLLM pads rows beyond the vocab
    assert vllm_source("model.embed_tokens.weight", config) == embed
    assert vllm_source("lm_head.weight", config) == embed  # tied: the same rows
    config.tie_word_embeddings = False
    assert vllm_source("lm_head.weight", config) == Source("lm_head.weight", 0, 500)


def test_vllm_source_qwen2_biases():
    config = Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=96, architectures=["Qwen2ForCausalLM"])
    name = "model.layers.0.self_attn.qkv_proj.bias"
    assert vllm_source("model.layers.0.self_attn.k_proj.bias", config) == Source(name, 64, 96)
    check_architecture(config)


def test_unknown_architecture_is_refused():
    config = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(SharedWeightsError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        check_architecture(config)


def vllm_layout(model: torch.nn.Module, config, pad_vocab_to: int = 64) -> dict:
    """The tensors vLLM would hold for `model`, by hand, all in one flat buffer like the
    worker's shared file: fused q|k|v and gate|up, the embedding padded, lm_head tied."""
    sd = model.state_dict()
    vocab = config.vocab_size
    padded = -(-vocab // pad_to) * pad_to if (pad_to := pad_vocab_to) else vocab
    embed = torch.zeros(padded, config.hidden_size)
    embed[:vocab] = sd["model.embed_tokens.weight"]
    embed[vocab:] = 7.0  # padding rows the trainer must not see
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": sd["model.norm.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(
            [sd[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        tensors[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(
            [sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"]])
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            tensors[f"{p}.{name}"] = sd[f"{p}.{name}"]
    offsets, total = aligned_layout([t.numel() * 4 for t in tensors.values()])
    buffer = torch.zeros(total, dtype=torch.uint8)
    out = {}
    for (name, t), offset in zip(tensors.items(), offsets):
        view = buffer[offset:offset + t.numel() * 4].view(torch.float32).view(t.shape)
        out[name] = view.copy_(t)
    return out


@pytest.fixture()
def hf_and_aliased(tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.vocab_size = 500  # exercise vLLM's vocab padding (500 -> 512 rows)
    hf.resize_token_embeddings(500)
    tensors = vllm_layout(hf, config)
    return hf, alias_model(config, tensors), tensors


def test_aliased_model_computes_what_the_hf_model_computes(hf_and_aliased):
    hf, aliased, tensors = hf_and_aliased
    assert check_aliased(aliased, tensors) == len(list(hf.parameters()))
    assert aliased.lm_head.weight is aliased.model.embed_tokens.weight  # one Parameter
    assert not any(b.is_meta for b in aliased.buffers())  # rotary frequencies recomputed
    ids = torch.tensor([[1, 5, 9, 300, 42, 7, 499]])
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, aliased(input_ids=ids).logits
    assert got.shape == (1, 7, 500)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_optimizer_step_writes_vllms_tensors_in_place(hf_and_aliased):
    _, aliased, tensors = hf_and_aliased
    qkv = tensors["model.layers.0.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    optimizer = torch.optim.AdamW(aliased.parameters(), lr=1e-2, foreach=True)
    ids = torch.tensor([[3, 4, 5, 6]])
    aliased(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    k_rows = slice(128, 256)  # tiny model: 4 heads of 32, q|k|v each 128 rows
    assert torch.equal(qkv[k_rows], aliased.model.layers[0].self_attn.k_proj.weight.detach())
    assert not torch.equal(qkv[k_rows], before[k_rows])  # the step landed in vLLM's memory
    assert (tensors["model.embed_tokens.weight"][500:] == 7.0).all()  # padding untouched
    check_aliased(aliased, tensors)


def test_check_aliased_catches_a_parameter_that_was_copied(hf_and_aliased):
    _, aliased, tensors = hf_and_aliased
    aliased.model.norm.weight = torch.nn.Parameter(aliased.model.norm.weight.detach().clone())
    with pytest.raises(SharedWeightsError, match="model.norm.weight no longer aliases"):
        check_aliased(aliased, tensors)


def export(**changes) -> dict:
    info = {**machine_identity(), "device": "cpu", "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1}
    return {**info, **changes}


def test_check_export_accepts_one_local_worker():
    assert check_export([export()], torch.device("cpu"))["device"] == "cpu"


@pytest.mark.parametrize("results, message", [
    ([export(), export()], "tensor and pipeline parallel size 1.*2 workers"),
    ([export(tensor_parallel_size=2)], "tensor and pipeline parallel size 1"),
    ([export(boot_id="another-boot")], "another machine"),
    ([export(hostname="elsewhere")], "another machine"),
    ([export(device="cuda")], "same device"),
])
def test_check_export_refuses_what_cannot_share(results, message):
    with pytest.raises(SharedWeightsError, match=message):
        check_export(results, torch.device("cpu"))


def test_open_tensors_maps_the_file_and_checks_its_token(tmp_path):
    values = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.ones(5, dtype=torch.bfloat16)]
    offsets, total = aligned_layout([v.numel() * v.element_size() for v in values])
    path = tmp_path / "weights"
    buffer = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    buffer[:HEADER] = torch.tensor(list(b"tok123".ljust(HEADER, b"\0")), dtype=torch.uint8)
    entries = []
    for name, value, offset in zip(("a", "b"), values, offsets):
        n = value.numel() * value.element_size()
        buffer[offset:offset + n].view(value.dtype).view(value.shape).copy_(value)
        entries.append({"name": name, "shape": list(value.shape),
                        "stride": list(value.stride()), "offset": offset,
                        "dtype": str(value.dtype).removeprefix("torch.")})
    info = {"device": "cpu", "path": str(path), "nbytes": total, "token": "tok123",
            "entries": entries}
    tensors = open_tensors(info, torch.device("cpu"))
    assert torch.equal(tensors["a"], values[0]) and torch.equal(tensors["b"], values[1])
    tensors["a"][1, 2] = -1.0  # a write through our mapping lands in the other one
    assert float(buffer[offsets[0] + 20:offsets[0] + 24].view(torch.float32)) == -1.0
    with pytest.raises(SharedWeightsError, match="token mismatch"):
        open_tensors({**info, "token": "other"}, torch.device("cpu"))
    os.unlink(path)
    with pytest.raises(SharedWeightsError, match="one machine"):
        open_tensors(info, torch.device("cpu"))


def test_ipc_arguments_survive_json():
    args = (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, torch.storage.TypedStorage,
            torch.bfloat16, 0, b"\x00handle\xff", 24, 0, False, b"ref", 8, None, True)
    encoded = [encode_ipc_arg(a) for a in args]
    import json
    decoded = [_decode_ipc_arg(a) for a in json.loads(json.dumps(encoded))]
    assert decoded == [torch.Tensor, (2, 3), (3, 1), 0, torch.storage.TypedStorage,
                       torch.bfloat16, 0, b"\x00handle\xff", 24, 0, False, b"ref", 8, None,
                       True]


def test_config_refuses_tensor_parallel_shared_vllm(tiny_model_dir):
    cfg = TrainConfig(mode="shared_vllm", model=str(tiny_model_dir),
                      vllm_tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor-parallel-size 1"):
        cfg.validate()
