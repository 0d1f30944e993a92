"""example-trainer: readable GRPO/GSPO trainers that keep a vLLM server in sync."""

__version__ = "0.1.0"
