"""full_nccl's bucket format and engine registration, without a server: the trainer's packing
(`send_buckets`) against the worker engine's receive (`GlooWeightTransferEngine`), through a
fake group that hands each broadcast bucket from one side to the other."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from example_trainer.vllm.gloo_engine import (ALIGN, GlooWeightTransferEngine, plan_buckets)
from example_trainer.vllm.plugin import BACKEND, register
from example_trainer.weight_transfer import GlooTrainerWeightTransferEngine, send_buckets
from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta
from vllm.distributed.weight_transfer.factory import (WeightTransferEngineFactory,
                                                      WeightTransferTrainerFactory)


def test_plan_respects_bucket_size_and_order():
    sizes = [100, 30, 500, 70, 8, 64, 1000, 4]
    plans = plan_buckets(sizes, bucket_bytes=256)
    assert [i for p in plans for i, _ in p.entries] == list(range(len(sizes)))  # all, once
    for plan in plans:
        if plan.direct:  # only a tensor larger than a bucket travels alone
            (index, offset), = plan.entries
            assert sizes[index] > 256 and offset == 0 and plan.nbytes == sizes[index]
            continue
        assert plan.nbytes <= 256
        assert all(offset % ALIGN == 0 for _, offset in plan.entries)
        ends = [offset + sizes[i] for i, offset in plan.entries]
        assert plan.nbytes == ends[-1]
        starts = [offset for _, offset in plan.entries]
        assert all(s >= e for s, e in zip(starts[1:], ends))  # no overlap
    assert sum(p.direct for p in plans) == 2
    with pytest.raises(ValueError):
        plan_buckets(sizes, 0)


class Tiny(torch.nn.Module):
    """Mixed dtypes and shapes, a tied weight (sent once), one tensor above the bucket,
    enough tensors for several packed buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)  # 4 KiB: larger than the bucket below
        self.proj = torch.nn.Linear(16, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 12) for _ in range(4))
        self.norm = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
        self.scale = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float16))
        self.head = torch.nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight


class FakeGroup:
    """Stands in for the gloo group: the worker's broadcast receives what the trainer's sent.
    `storages`: the receive buffers the worker used, kept alive so that no address is
    reused and each address is one buffer."""

    def __init__(self, sent: list[torch.Tensor]) -> None:
        self.sent = sent
        self.storages: dict[int, torch.UntypedStorage] = {}

    def broadcast(self, tensors: list[torch.Tensor], opts: object) -> SimpleNamespace:
        data = self.sent.pop(0)
        assert tensors[0].dtype == torch.uint8 and tensors[0].numel() == data.numel()
        tensors[0].copy_(data)
        storage = tensors[0].untyped_storage()
        self.storages[storage.data_ptr()] = storage
        return SimpleNamespace(wait=lambda: None)


class Receiver(torch.nn.Module):
    """A model with no vLLM layers (nothing to re-pack): `load_weights` keeps copies of what
    it is handed, as a weight loader copies out of the bucket, and names them."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> set[str]:
        self.loaded.extend((n, t.clone()) for n, t in pairs)
        return {n for n, _ in pairs}


def worker_engine(model: torch.nn.Module, bucket_bytes: int) -> GlooWeightTransferEngine:
    parallel = SimpleNamespace(rank=0, world_size=1, data_parallel_index=0)
    vllm_config = SimpleNamespace(parallel_config=parallel, model_config=None)
    engine = GlooWeightTransferEngine(None, vllm_config, torch.device("cpu"), model)
    engine.bucket_bytes, engine.timeout_s = bucket_bytes, 5.0
    return engine


def test_round_trip_is_exact_with_one_bucket_of_extra_memory():
    torch.manual_seed(0)
    model, bucket_bytes = Tiny(), 1024
    source = ModuleSource(model)
    meta = source.metadata()
    assert [m.name for m in meta].count("embed.weight") == 1 and "head.weight" not in [
        m.name for m in meta]  # tied: once
    params = {n: p for n, p in model.named_parameters()}
    sent: list[torch.Tensor] = []
    buffers: set[int] = set()

    def send(bucket: torch.Tensor) -> None:
        own = [n for n, p in params.items() if p.data_ptr() == bucket.data_ptr()]
        if own:  # a tensor above the bucket size goes from the parameter's own memory
            assert bucket.numel() > bucket_bytes, own
        else:
            assert bucket.numel() <= bucket_bytes
            buffers.add(bucket.untyped_storage().data_ptr())
        sent.append(bucket.clone())

    count = send_buckets(source, meta, bucket_bytes, send)
    assert count == len(sent) > 2
    assert len(buffers) == 1  # one bucket buffer, reused: never a second copy of the model

    receiver = Receiver()
    engine = worker_engine(receiver, bucket_bytes)
    engine.group = group = FakeGroup(sent)
    packed = sum(bucket.numel() <= bucket_bytes for bucket in sent)
    engine.start_weight_update()  # in place: no layer here to rebuild or re-pack
    engine.update_weights({"names": [m.name for m in meta],
                           "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
                           "shapes": [list(m.shape) for m in meta]})
    engine.finish_weight_update()
    assert not sent  # every bucket consumed
    # Received in place: two buffers in turn for the packed buckets (one in flight while
    # the other is loaded), a buffer of its own for each tensor above the bucket size.
    assert packed > 2 and len(group.storages) == 2 + (count - packed)
    assert [n for n, _ in receiver.loaded] == [m.name for m in meta]
    for name, tensor in receiver.loaded:
        expected = params[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected.detach()), name


def test_source_that_disagrees_with_its_metadata_fails_before_sending():
    model = Tiny()
    meta = ModuleSource(model).metadata()
    wrong = [ParamMeta(m.name, torch.float64 if i == 1 else m.dtype, m.shape)
             for i, m in enumerate(meta)]
    with pytest.raises(ValueError, match="metadata"):
        send_buckets(ModuleSource(model), wrong, 1 << 20, lambda bucket: None)


def test_engine_registered_by_the_vllm_plugin_entry_point():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("example_trainer_gloo") == "example_trainer.vllm.plugin:register"
    register()
    register()  # vLLM may load plugins more than once per process
    assert WeightTransferEngineFactory._registry[BACKEND]() is GlooWeightTransferEngine
    assert (WeightTransferTrainerFactory._registry[BACKEND]()
            is GlooTrainerWeightTransferEngine)
