"""vLLM plugin of this package: registers the `example_gloo` weight-transfer engine.

pyproject.toml names `register` under `[project.entry-points."vllm.general_plugins"]`, so
vLLM calls it in each of its processes (API server, engine core, workers) before it builds
the worker's engine from `--weight-transfer-config '{"backend": "example_gloo"}'`. The
trainer calls it too, for the trainer-side registry. Registration is by module path (vLLM
imports the engine only when a server asks for it), so every other vLLM server started from
this environment pays nothing, and calling it twice is harmless.
"""

from __future__ import annotations

BACKEND = "example_gloo"


def register() -> None:
    """Add the worker-side and trainer-side gloo engines to vLLM's registries."""
    from vllm.distributed.weight_transfer.factory import (WeightTransferEngineFactory,
                                                          WeightTransferTrainerFactory)
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "example_trainer.vllm.gloo_engine", "GlooWeightTransferEngine")
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(
            BACKEND, "example_trainer.weight_transfer", "GlooTrainerWeightTransferEngine")
