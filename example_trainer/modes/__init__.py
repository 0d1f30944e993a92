"""One file per way of moving weights to vLLM; each `train(config)` reads top to bottom."""
