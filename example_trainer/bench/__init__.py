"""Benchmarks that are not part of a training run.

- `python -m example_trainer.bench`: every mode on the same work (`compare.py` runs it;
  `processes.py` starts and watches the servers and trainers, `reference.py` measures the
  bare memcpy / broadcast limits and the optimizers, `report.py` makes the table, JSON and
  chart, `learning.py` the learning view of `--learning`: accuracy and reward against
  wall-clock seconds, time to 0.5 and 0.7 accuracy);
- `python -m example_trainer.bench.lora_sync`: the LoRA sync paths side by side.

Deliberately empty: importing a submodule must not pull in vLLM, the trainer or the
other tools. The per-step `Recorder` of a training run is `example_trainer.recorder`.
"""
