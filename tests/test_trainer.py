"""Small pure pieces of the shared run set-up."""

from __future__ import annotations

import pytest

from example_trainer.config import TrainConfig
from example_trainer.serving import vllm_lora_options


@pytest.mark.parametrize("rank, served_rank", [(1, 1), (4, 8), (8, 8), (9, 16), (200, 256)])
def test_lora_rank_rounds_up_to_one_vllm_accepts(rank, served_rank):
    options = vllm_lora_options(TrainConfig(mode="lora_hotswap", trains="lora", lora_rank=rank))
    assert options == {"served_model_name": "base", "enable_lora": True,
                       "max_lora_rank": served_rank}


def test_lora_rank_beyond_vllm_is_refused():
    with pytest.raises(ValueError, match="largest LoRA rank 512"):
        vllm_lora_options(TrainConfig(mode="lora_hotswap", trains="lora", lora_rank=513))
