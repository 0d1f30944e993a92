"""Every option of the trainer in one dataclass.

The CLI (`cli.py`) and config files (TOML or YAML, same key names) are generated from the
fields below, so a new option is one line here: its default, its help text and, where it has
a fixed set of values, its choices. Validation that needs more than one field lives in
`TrainConfig.validate()` so bad combinations fail before anything starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from environments.transport import api_token, exposed_without_secret, is_loopback

MODES = ("legacy", "shared_vllm", "lora_hotswap", "lora_nccl", "full_nccl")
LORA_MODES = ("lora_hotswap", "lora_nccl")
TRAINS_CHOICES = ("full", "lora")  # what a mode declares it trains (its TRAINS)
OPTIMIZER_NAMES = ("adamw", "adamw_8bit", "adamw_cpu", "adafactor")
LOSSES = ("grpo", "gspo", "gspo_token")
LOSS_LEVEL = {"grpo": "token", "gspo": "sequence", "gspo_token": "sequence_token"}
# Per-loss clip defaults: GSPO ratios are sequence-level geometric means, so they need a far
# narrower trust region (Zheng et al. 2025 use 3e-4 / 4e-4).
DEFAULT_EPS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4)}
NORMS = ("sequence", "token", "constant")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, group: str = "") -> Any:
    """A dataclass field that carries its CLI help text and choices."""
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to run -------------------------------------------------------------------
    mode: str = opt("legacy", "How vLLM gets new weights. One of the built-in modes, or "
                    "'package.module:function' / 'path/to/file.py:function' for your own "
                    "copy of a mode.", group="run")
    model: str = opt(DEFAULT_MODEL, "Model to train: a local directory, a Hugging Face id "
                     "(where a hub is reachable), or the embedded default "
                     f"'{DEFAULT_MODEL}' (prepared offline on first use).", group="run")
    steps: int = opt(20, "Number of training steps (optimizer updates).", group="run")
    seed: int = opt(0, "Random seed for torch, Python and LoRA initialisation.", group="run")
    device: str = opt("auto", "Trainer device; 'auto' picks CUDA when available.", DEVICES, "run")
    dtype: str = opt("auto", "Trainer weight (compute) dtype; 'auto' is bfloat16 on CUDA and "
                     "float32 on CPU (fp32 keeps vLLM and trainer log-probs comparable). With "
                     "bfloat16/float16 the optimizer updates fp32 master weights unless "
                     "--master-weights off.", DTYPES, "run")

    # --- data --------------------------------------------------------------------------
    api_url: str = opt("http://127.0.0.1:8000", "Trajectory API (Atropos run-api protocol).",
                       group="data")
    api_timeout: float = opt(30.0, "Seconds to wait for the API to answer at start-up.",
                             group="data")
    batch_timeout: float = opt(600.0, "Seconds to wait for one batch before giving up.",
                               group="data")
    batch_size: int = opt(16, "Sequences per training step (the API serves exactly this).",
                          group="data")
    micro_batch_size: int = opt(4, "Sequences per forward/backward; gradients accumulate.",
                                group="data")
    micro_batch_tokens: int = opt(-1, "Split each batch by padded tokens instead: "
                                  "micro-batches of as many sequences as fit N tokens (rows x "
                                  "longest row; longest sequences first). 0: off, use "
                                  "--micro-batch-size; -1 (auto): on CUDA probe the largest "
                                  "budget that fits free GPU memory at start-up, on CPU use "
                                  "--micro-batch-size.", group="data")
    max_token_len: int = opt(512, "Longest sequence (prompt + completion) the API accepts.",
                             group="data")
    adv_std_norm: bool = opt(True, "Divide group advantages by the group's reward std "
                             "(off: Dr. GRPO).", group="data")

    # --- loss --------------------------------------------------------------------------
    loss: str = opt("grpo", "grpo: token-level ratio; gspo: sequence-level ratio; gspo_token: "
                    "GSPO with per-token gradients.", LOSSES, "loss")
    eps_low: float | None = opt(None, "Lower clip epsilon (default 0.2 for grpo, 3e-4 for "
                                "gspo*).", group="loss")
    eps_high: float | None = opt(None, "Upper clip epsilon, > eps_low for clip-higher "
                                 "(default 0.2 for grpo, 4e-4 for gspo*).", group="loss")
    norm: str = opt("sequence", "Loss normalisation: sequence (mean per sequence, then over "
                    "sequences), token (all tokens of the batch), constant (B*T).", NORMS, "loss")
    kl_coef: float = opt(0.0, "KL penalty (k3) to the reference policy: the base model with "
                         "the adapter disabled in LoRA modes, the batch's ref_logprobs "
                         "otherwise.", group="loss")
    logprob_chunk_size: int = opt(1024, "Positions per chunk when computing sampled-token "
                                  "log-probs (bounds logits memory).", group="loss")

    # --- optimisation ------------------------------------------------------------------
    optimizer: str = opt("adamw", "Optimizer.", OPTIMIZER_NAMES, "optim")
    lr: float = opt(1e-5, "Peak learning rate.", group="optim")
    warmup_steps: int = opt(0, "Linear warm-up steps.", group="optim")
    lr_schedule: str = opt("constant", "Learning-rate schedule after warm-up.", SCHEDULES,
                           "optim")
    weight_decay: float = opt(0.0, "Decoupled weight decay.", group="optim")
    master_weights: str = opt("auto", "fp32 master weights for bfloat16/float16 parameters: "
                              "'auto' keeps an fp32 copy (4 B/param) that the optimizer "
                              "updates and rounds into the model after each step; 'off' "
                              "updates the low-precision weights directly, losing updates "
                              "below ~1/256 of a weight (most of them at lr 1e-6). adamw_cpu "
                              "always keeps its own masters.", ("auto", "off"), "optim")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).",
                               group="optim")
    grad_checkpointing: bool = opt(False, "Activation checkpointing: recompute each decoder "
                                   "layer's activations in backward instead of storing them "
                                   "(less memory, about a third more compute).",
                                   group="optim")

    # --- LoRA --------------------------------------------------------------------------
    lora_rank: int = opt(8, "LoRA rank (lora_* modes).", group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha.", group="lora")
    lora_dropout: float = opt(0.0, "LoRA dropout.", group="lora")
    lora_target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get an adapter.", group="lora")
    lora_layers: list[int] = opt([], "Only adapt these layer indices (empty: all layers).",
                                 group="lora")
    lora_sync_backend: str = opt("auto", "Process-group backend of lora_nccl's adapter "
                                 "broadcast; 'auto' is NCCL when the trainer is on CUDA, "
                                 "gloo otherwise.", ("auto", "gloo", "nccl"), "lora")
    sync_pause: str = opt("wait", "How generation meets an in-memory swap (lora_nccl, "
                          "lora_hotswap, full_nccl): 'wait' pauses vLLM "
                          "(/pause?mode=wait) until running requests finish, swaps, then "
                          "resumes, so no sequence mixes two policies; 'none' swaps between "
                          "engine steps while requests run (PipelineRL-style; rollouts are "
                          "tagged with the weight version they started under).",
                          ("wait", "none"), "vllm")

    # --- vLLM --------------------------------------------------------------------------
    vllm_url: str = opt("", "Use a vLLM server you started yourself (e.g. "
                        "http://127.0.0.1:9001) instead of starting one.", group="vllm")
    vllm_port: int = opt(9001, "Port of the vLLM server the trainer starts.", group="vllm")
    vllm_host: str = opt("127.0.0.1", "Address the vLLM server the trainer starts listens on; "
                         "any other than loopback needs the shared secret in "
                         "EXAMPLE_TRAINER_API_TOKEN (vLLM's API key, on every route).",
                         group="vllm")
    vllm_gpu_memory_utilization: float = opt(0.45, "GPU memory share for vLLM (GPU only).",
                                             group="vllm")
    vllm_tensor_parallel_size: int = opt(1, "vLLM tensor parallel size (GPU only).",
                                         group="vllm")
    vllm_kv_cache_gib: int = opt(1, "KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).",
                                 group="vllm")
    vllm_enforce_eager: bool = opt(True, "Start vLLM with --enforce-eager (faster start-up).",
                                   group="vllm")
    vllm_startup_timeout: float = opt(300.0, "Seconds to wait for vLLM's /health.",
                                      group="vllm")
    vllm_extra_args: list[str] = opt([], "Extra arguments passed to the vLLM server.",
                                     group="vllm")
    served_name: str = opt("policy", "Model name vLLM serves the current policy under; the "
                           "environment samples with it (in LoRA modes it is the adapter's "
                           "name).", group="vllm")
    sync_every: int = opt(1, "Steps between weight syncs to vLLM.", group="vllm")
    sync_bucket_mib: float = opt(64.0, "full_nccl: MiB per packed bucket of a sync (the "
                                 "trainer's extra memory during a sync; a tensor larger than "
                                 "a bucket is sent on its own).", group="vllm")
    sync_host: str = opt("127.0.0.1", "lora_nccl, full_nccl: this trainer's address (rank "
                         "0's) that vLLM's workers connect to for the weight-sync group "
                         "(its rendezvous store and gloo/NCCL sockets); set it when vLLM "
                         "runs on another machine. The group has no authentication: any "
                         "other than loopback needs EXAMPLE_TRAINER_API_TOKEN set, and a "
                         "network only vLLM's machine can reach (README, 'Security').",
                         group="vllm")
    sync_timeout: float = opt(120.0, "Seconds a weight-sync collective, or vLLM's /health "
                              "while the trainer waits for data, may stall before the run "
                              "fails with an error naming the cause.", group="vllm")
    restart_vllm_on_failure: bool = opt(False, "If the vLLM server the trainer started exits "
                                        "(or stops answering /health for --sync-timeout) "
                                        "during training, restart it and sync the current "
                                        "weights again instead of failing; gives up after 3 "
                                        "restarts. Not with --vllm-url or shared_vllm.",
                                        group="vllm")
    parity_check: bool = opt(False, "After every sync, compare vLLM's log-probs of a probe "
                             "sequence with the trainer's and fail if they differ by more "
                             "than --parity-atol (the proof that the sync worked).",
                             group="vllm")
    parity_atol: float = opt(1e-4, "Largest allowed |vLLM - trainer| probe log-prob gap "
                             "(fp32 on CPU agrees to ~1e-6).", group="vllm")

    # --- evaluation --------------------------------------------------------------------
    eval_env: str = opt("environments.arithmetic:ArithmeticEnv", "Environment class whose "
                        "held-out set is scored through vLLM before and after training "
                        "(empty: no evaluation).", group="eval")
    eval_size: int = opt(64, "Held-out problems per evaluation (0: no evaluation).",
                         group="eval")
    eval_every: int = opt(0, "Also evaluate every N steps, right after a sync, for the "
                          "learning curve (accuracy.png in --save-path); 0: only before and "
                          "after training. Its time is kept apart from the steps' times.",
                          group="eval")
    eval_temperature: float = opt(1.0, "Sampling temperature of the evaluation (0: greedy).",
                                  group="eval")
    eval_max_tokens: int = opt(48, "Completion tokens per evaluation answer.", group="eval")

    # --- output ------------------------------------------------------------------------
    save_path: str = opt("runs/latest", "Directory for checkpoints, logs and benchmark files.",
                         group="output")
    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end).", group="output")
    keep_checkpoints: int = opt(2, "How many step checkpoints to keep.", group="output")
    resume: str = opt("", "Resume from a checkpoint directory (or a save_path: its latest).",
                      group="output")
    benchmark: bool = opt(False, "Record per-step timing and memory and print a summary.",
                          group="output")
    benchmark_json: str = opt("", "Write every step and the summary to this JSON file.",
                              group="output")
    wandb_project: str = opt("", "Log to this Weights & Biases project (empty: off).",
                             group="output")
    wandb_group: str = opt("", "Weights & Biases group.", group="output")
    log_level: str = opt("INFO", "Logging level.", ("DEBUG", "INFO", "WARNING", "ERROR"),
                         "output")

    # --- declared by the mode, not a flag ----------------------------------------------
    trains: str = field(default="", metadata={"help": "", "choices": TRAINS_CHOICES,
                                              "group": "", "internal": True})
    # the mode's DEFAULTS that no config file or flag overrode (logged at start)
    mode_defaults: dict = field(default_factory=dict, metadata={
        "help": "", "choices": None, "group": "", "internal": True})

    # --- derived -----------------------------------------------------------------------
    @property
    def level(self) -> str:
        """Importance-ratio level that `loss.policy_loss` expects."""
        return LOSS_LEVEL[self.loss]

    @property
    def clip_eps(self) -> tuple[float, float]:
        low, high = DEFAULT_EPS[self.loss]
        return (low if self.eps_low is None else self.eps_low,
                high if self.eps_high is None else self.eps_high)

    @property
    def is_lora(self) -> bool:
        """The mode trains a LoRA adapter (its TRAINS), not the full model."""
        return self.trains == "lora"

    def check_trains(self, trains: str) -> None:
        """The mode's declaration (TRAINS = "full" or "lora") against the flags given:
        LoRA flags only apply to a mode that trains an adapter."""
        if trains not in TRAINS_CHOICES:
            raise ConfigError(f"--mode {self.mode}: TRAINS must be one of "
                              f"{', '.join(TRAINS_CHOICES)}, got {trains!r}")
        lora_changed = [f.name for f in dataclasses.fields(self)
                        if f.metadata.get("group") == "lora"
                        and getattr(self, f.name) != getattr(DEFAULTS, f.name)]
        if lora_changed and trains != "lora":
            raise ConfigError(
                f"--{dashed(lora_changed[0])} only applies to modes that train a LoRA adapter "
                f"(TRAINS = 'lora': {', '.join(LORA_MODES)} or your own), not --mode "
                f"{self.mode}, which trains the full model: drop it or choose a LoRA mode")

    def validate(self) -> "TrainConfig":
        """Reject bad values and combinations before any process starts."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("steps", "batch_size", "micro_batch_size", "max_token_len", "sync_every",
                     "lora_rank", "logprob_chunk_size"):
            need(getattr(self, name) > 0, f"--{dashed(name)} must be positive, got "
                 f"{getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "save_every", "weight_decay", "max_grad_norm", "kl_coef",
                     "lora_dropout", "keep_checkpoints"):
            need(getattr(self, name) >= 0, f"--{dashed(name)} must be >= 0, got "
                 f"{getattr(self, name)}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.sync_timeout > 0, f"--sync-timeout must be positive, got {self.sync_timeout}")
        need(self.sync_bucket_mib > 0, "--sync-bucket-mib must be positive, got "
             f"{self.sync_bucket_mib}")
        need(":" in self.mode or self.mode in MODES,
             f"invalid --mode {self.mode!r}: choose from {', '.join(MODES)} or give "
             "'package.module:function' / 'file.py:function'")
        low, high = self.clip_eps
        need(0 <= low < 1 and high >= 0, f"clip epsilons must satisfy 0 <= eps_low < 1 and "
             f"eps_high >= 0, got {low}, {high}")
        need(self.micro_batch_tokens >= -1, "--micro-batch-tokens must be a token budget > 0, "
             f"0 (off) or -1 (auto), got {self.micro_batch_tokens}")
        need(self.micro_batch_size <= self.batch_size,
             f"--micro-batch-size ({self.micro_batch_size}) exceeds --batch-size "
             f"({self.batch_size})")
        if self.trains:
            self.check_trains(self.trains)
        need(not (self.mode == "legacy" and self.vllm_url),
             "--mode legacy restarts vLLM itself, so it cannot use a server you started "
             "(--vllm-url); drop --vllm-url or use lora_hotswap or lora_nccl")
        need(not (self.restart_vllm_on_failure and self.vllm_url),
             "--restart-vllm-on-failure restarts the vLLM server the trainer started, but "
             "--vllm-url names a server you started, which the trainer cannot restart: drop "
             "one of the two (or restart your server yourself)")
        need(not (self.restart_vllm_on_failure and self.mode == "shared_vllm"),
             "--restart-vllm-on-failure does not work with shared_vllm: the trainer's "
             "parameters are views of the dead server's memory, so a new server would need "
             "them re-attached mid-run; drop the flag (a failure then checkpoints, and "
             "--resume continues) or use another mode")
        need(self.vllm_tensor_parallel_size == 1 or self.mode != "shared_vllm",
             "shared_vllm needs --vllm-tensor-parallel-size 1 (each trainer parameter aliases "
             "one vLLM tensor)")
        need(self.model == DEFAULT_MODEL or Path(self.model).expanduser().is_dir()
             or _looks_like_hub_id(self.model),
             f"model directory {self.model!r} does not exist: pass --model with a directory "
             "holding config.json, a Hugging Face id, or leave the default to use the "
             "embedded model")
        if self.resume:
            need(Path(self.resume).exists(), f"--resume {self.resume!r} does not exist")
        need(bool(self.vllm_url) or is_loopback(self.vllm_host) or api_token() is not None,
             exposed_without_secret("vLLM", self.vllm_host, "--vllm-host", token_flag=False))
        need(is_loopback(self.sync_host) or api_token() is not None,
             exposed_without_secret("the weight-sync group", self.sync_host, "--sync-host",
                                    token_flag=False))
        return self


class ConfigError(ValueError):
    """A bad option value; the message names the option and what would be valid."""


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' or 'name', not a filesystem path (those must exist)."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def dashed(name: str) -> str:
    return name.replace("_", "-")


DEFAULTS = TrainConfig()
