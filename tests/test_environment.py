"""Environment runner and arithmetic task: verifier, generator, ScoredData, protocol, e2e.

Unit tests use no servers. The API tests start the real trajectory API (well under a second).
Tests marked slow also start a real vLLM server on the tiny random model.
"""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests

from environments.arithmetic import (DIFFICULTIES, PROMPT, SYSTEM_MESSAGE, ArithmeticEnv,
                                     eval_items, extract_answer, make_item)
from environments.api_client import TrajectoryClient as EnvApiClient
from environments.base import (Completion, EnvConfig, EnvStats, Environment, Item,
                               MalformedResponse, ModelNameCheck, ModelNotServed,
                               VLLMUnavailable, build_scored_group, parse_choice,
                               queued_sequences, scores_all_equal)

from conftest import free_port, start_api_server, stop_process_group

# ------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("42", 42),
    ("\\boxed{42}", 42),
    ("The answer is \\boxed{42}.", 42),
    ("The answer is 42.", 42),
    ("3+4 = 7", 7),
    ("-17", -17),
    ("The result is -17.", -17),
    ("\\boxed{-5}", -5),
    ("It is 1,234.", 1234),
    ("\\boxed{1,234}", 1234),
    ("First I guessed 3, then \\boxed{8}, finally 9", 8),
    ("12.0", 12),
    ("  7\n", 7),
])
def test_extract_answer_accepts(text: str, expected: int) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no number here", "???!!", "\\boxed{}", "\\boxed{abc}",
                                  "\\boxed{x} and 5", "12.5", "<|im_end|>"])
def test_extract_answer_malformed_is_none(text: str) -> None:
    assert extract_answer(text) is None


def test_score_exact_match_only() -> None:
    env = ArithmeticEnv(EnvConfig())
    item = make_item("3+4")
    assert item.answer == 7
    assert env.score(item, "7") == 1.0
    assert env.score(item, "The answer is \\boxed{7}.") == 1.0
    for wrong in ("8", "-7", "77", "7.5", "", "seven", "\\boxed{8} 7"):
        assert env.score(item, wrong) == 0.0, wrong


def test_partial_credit_shapes_training_reward_but_not_eval_accuracy() -> None:
    env = ArithmeticEnv(EnvConfig(), partial_credit=0.1)
    item = make_item("3+4")
    assert (env.score(item, "7"), env.score(item, "8"), env.score(item, "no")) == \
        (1.0, 0.1, 0.0)
    assert (env.eval_score(item, "7"), env.eval_score(item, "8")) == (1.0, 0.0)


def test_binary_minus_is_not_a_negative_sign() -> None:
    assert extract_answer("10-3") == 3
    assert extract_answer("so 5-3=2") == 2


# ------------------------------------------------------------------------------------------
# Problem generator and held-out set
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", [0, *DIFFICULTIES])
def test_generated_answers_are_correct(difficulty: int) -> None:
    env = ArithmeticEnv(EnvConfig(seed=3), difficulty=difficulty)
    for _ in range(300):
        item = env.get_prompt(env.rng)
        assert re.fullmatch(r"[0-9+\-*()]+", item.expression)
        assert item.answer == eval(item.expression)  # noqa: S307 - digits and + - * ( ) only
        assert item.messages == [SYSTEM_MESSAGE, {"role": "user",
                                                  "content": PROMPT.format(expr=item.expression)}]


def test_difficulty_levels_have_their_shape() -> None:
    rng = random.Random(0)
    level = {d: [ArithmeticEnv(EnvConfig(), difficulty=d).get_prompt(rng).expression
                 for _ in range(50)] for d in DIFFICULTIES}
    assert all(re.fullmatch(r"\d\+\d", e) for e in level[1])
    assert all(re.fullmatch(r"\d\d[+-]\d\d", e) for e in level[2])
    assert all(re.fullmatch(r"\d{1,2}\*\d{1,2}", e) for e in level[3])
    assert all(e.count("+") + e.count("-") + e.count("*") == 3 for e in level[4])
    with pytest.raises(ValueError):
        ArithmeticEnv(EnvConfig(), difficulty=7)


def test_seeds_are_reproducible() -> None:
    def draw(seed: int) -> list[str]:
        env = ArithmeticEnv(EnvConfig(seed=seed), difficulty=2)
        return [env.get_prompt(env.rng).expression for _ in range(30)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert [i.expression for i in eval_items(40, seed=5, difficulty=3)] == \
        [i.expression for i in eval_items(40, seed=5, difficulty=3)]
    assert [i.expression for i in eval_items(40, seed=5, difficulty=3)] != \
        [i.expression for i in eval_items(40, seed=6, difficulty=3)]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_eval_set_is_disjoint_from_training(difficulty: int) -> None:
    env = ArithmeticEnv(EnvConfig(seed=0), difficulty=difficulty)
    training = {env.get_prompt(env.rng).expression for _ in range(3000)}
    held_out = {item.expression for item in env.eval_items(200, seed=0)}
    assert held_out and not training & held_out
    assert len(env.eval_items(200, seed=0)) == 200


# ------------------------------------------------------------------------------------------
# vLLM responses -> ScoredData (pure functions, fake completions)
# ------------------------------------------------------------------------------------------

def vllm_choice(index: int, ids: list[int], logprobs: list[float], text: str,
                finish_reason: str = "stop") -> dict[str, Any]:
    """A choice in the shape vLLM 0.32 returns with logprobs=0, return_tokens_as_token_ids."""
    return {"index": index, "text": text, "finish_reason": finish_reason, "stop_reason": None,
            "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": logprobs,
                         "text_offset": list(range(len(ids))),
                         "top_logprobs": [{f"token_id:{t}": lp}
                                          for t, lp in zip(ids, logprobs)]}}


def test_parse_choice_reads_token_ids_and_logprobs() -> None:
    c = parse_choice(vllm_choice(0, [17, 42, 2], [-0.5, -1.25, -0.01], " 7"))
    assert c == Completion([17, 42, 2], [-0.5, -1.25, -0.01], " 7", "stop")
    # return_token_ids=true puts the ids in their own field; they take precedence.
    choice = vllm_choice(0, [5], [-0.1], "x") | {"token_ids": [5]}
    assert parse_choice(choice).token_ids == [5]


def test_parse_choice_rejects_missing_fields() -> None:
    with pytest.raises(MalformedResponse, match="return_tokens_as_token_ids"):
        parse_choice({"index": 0, "text": "7", "logprobs": {"tokens": ["7"],
                                                            "token_logprobs": [-0.1]}})
    with pytest.raises(MalformedResponse, match="token ids"):
        parse_choice({"index": 0, "text": "7", "logprobs": None})
    with pytest.raises(MalformedResponse, match="log-probs"):
        bad = vllm_choice(0, [1, 2], [-0.1, -0.2], "7")
        bad["logprobs"]["token_logprobs"] = [-0.1]
        parse_choice(bad)


def test_build_scored_group_aligns_everything_with_tokens() -> None:
    prompt = [1, 294, 201]
    completions = [Completion([10, 11, 2], [-0.5, -1.0, -0.1], "a"),
                   Completion([12], [-2.0], "b")]
    group = build_scored_group(prompt, completions, [1.0, 0.0], temperature=0.7, env_id=3)
    assert group["tokens"] == [[1, 294, 201, 10, 11, 2], [1, 294, 201, 12]]
    assert group["masks"] == [[-100, -100, -100, 10, 11, 2], [-100, -100, -100, 12]]
    assert group["inference_logprobs"] == [[1.0, 1.0, 1.0, -0.5, -1.0, -0.1],
                                           [1.0, 1.0, 1.0, -2.0]]
    assert group["scores"] == [1.0, 0.0]
    assert group["generation_params"] == {"temperature": 0.7}
    assert group["env_id"] == 3
    for key in ("masks", "inference_logprobs"):
        assert [len(row) for row in group[key]] == [len(row) for row in group["tokens"]]
    with pytest.raises(ValueError):
        build_scored_group(prompt, completions, [1.0], temperature=1.0)


def test_score_group_drops_and_counts_all_equal_groups() -> None:
    env = ArithmeticEnv(EnvConfig(group_size=3, temperature=1.0))
    item = make_item("2+3")
    prompt = [1, 2, 3]

    def completions(*texts: str) -> list[Completion]:
        return [Completion([7, i + 8, 2], [-0.1, -0.2, -0.3], t) for i, t in enumerate(texts)]

    assert env.score_group(item, prompt, completions("5", "\\boxed{5}", "5.")) is None
    assert env.score_group(item, prompt, completions("4", "x", "")) is None
    assert env.stats.dropped_equal == 2
    group = env.score_group(item, prompt, completions("5", "4", "The answer is 5"))
    assert group is not None and group["scores"] == [1.0, 0.0, 1.0]
    assert group["messages"][1] == [*item.messages, {"role": "assistant", "content": "4"}]
    assert env.stats.groups_sampled == 3 and env.stats.samples == 9
    assert env.stats.mean_reward == pytest.approx(5 / 9)
    assert scores_all_equal([0.5]) and not scores_all_equal([0.5, 0.25])


def test_queued_sequences_reads_both_api_flavours() -> None:
    assert queued_sequences({"env_queue_size": 12, "self_queue_size": 1}, 8) == 12
    assert queued_sequences({"self_queue_size": 2}, 8) == 16  # Atropos: groups
    assert queued_sequences({"queue_size": 100}, 8) is None
    # This project's /status-env: queue_size in groups (all environments), like run-api.
    assert queued_sequences({"queue_size": 5, "queued_sequences": 40, "env_queue_size": 16,
                             "self_queue_size": 2}, 8) == 16


def test_model_name_check_gives_up_only_after_answers_lack_the_name() -> None:
    check = ModelNameCheck("policy", grace=60)
    assert check.observe(["base"], now=100) is None       # adapter not registered yet
    assert check.observe(["base"], now=159) is None
    message = check.observe(["base", "other"], now=160)
    assert message is not None and "'base', 'other'" in message and "'policy'" in message


def test_model_name_check_never_counts_an_unreachable_vllm() -> None:
    check = ModelNameCheck("policy", grace=60)
    assert check.observe(["base"], now=0) is None
    assert all(check.observe(None, now=t) is None for t in (30, 100, 1000))  # restarting
    assert check.observe(["base"], now=1001) is None      # a new server: a new grace period
    assert check.observe(["base"], now=1060) is None
    assert check.observe(["base"], now=1062) is not None
    assert check.observe(["base", "policy"], now=1063) is None   # registered: all clear
    assert check.observe(["base"], now=1100) is None


def test_model_name_check_restarts_its_clock_after_a_request_succeeded() -> None:
    # lora_hotswap unloads and reloads 'policy' every sync: a 404 in each swap window, with
    # successful requests between them. Found killing an environment after ~200 s of them.
    check = ModelNameCheck("policy", grace=60)
    assert check.observe(["base"], now=0) is None           # a swap window
    check.served()                                          # sampled fine since
    assert check.observe(["base"], now=100) is None         # the next window: a new period
    assert check.observe(["base"], now=159) is None
    assert check.observe(["base"], now=161) is not None     # missing for 61 s in a row


def test_finished_from_explicit_signal_or_run_api_step_count(caplog) -> None:
    client = EnvApiClient(EnvConfig(), EnvStats(), threading.Lock(), threading.Event())
    client.num_steps = 10
    assert client.finished_in({"training_finished": True, "current_step": 0})
    assert not client.finished_in({"training_finished": False, "current_step": 99})
    assert not caplog.records
    with caplog.at_level("WARNING"):
        # Atropos' run-api: no training_finished; over once the last batch was taken.
        assert not client.finished_in({"current_step": 9, "queue_size": 0})
        assert client.finished_in({"current_step": 10, "queue_size": 0})
        client.num_steps = None
        assert not client.finished_in({"current_step": 10})   # unknown: never guessed
    warnings = [r for r in caplog.records if "no training_finished" in r.getMessage()]
    assert len(warnings) == 1


class FakeTokenizer:
    """Stands in for transformers 5's BatchEncoding answer to apply_chat_template."""
    eos_token_id = 2

    def apply_chat_template(self, messages: list, **kwargs: Any) -> Any:
        if "return_dict" in kwargs:
            raise TypeError("unexpected keyword argument 'return_dict'")
        return {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1]}


def test_prompt_ids_handles_dict_answers() -> None:
    env = ArithmeticEnv(EnvConfig(), tokenizer=FakeTokenizer())
    assert env.prompt_ids(make_item("1+1")) == [1, 5, 6]


def test_prompt_ids_with_real_chat_template(tiny_model_dir) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    env = ArithmeticEnv(EnvConfig(tokenizer=str(tiny_model_dir)))
    ids = env.prompt_ids(make_item("1+1"))
    assert all(isinstance(t, int) for t in ids)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "What is 1+1?" in text


def test_prompt_skips_the_templates_default_system_text(tiny_model_dir) -> None:
    """SmolLM2's template adds its own system text when the first turn is not a system
    one; the task's empty system turn keeps those tokens out of every training sequence."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    default = "You are a helpful AI assistant"
    tok.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + default + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    user_only = [make_item("1+1").messages[-1]]
    assert default in tok.apply_chat_template(user_only, tokenize=False)  # the template's
    env = ArithmeticEnv(EnvConfig(), tokenizer=tok)
    text = tok.decode(env.prompt_ids(make_item("1+1")))
    assert default not in text and "What is 1+1?" in text


def test_a_template_without_a_system_role_gets_the_user_turn_alone(tiny_model_dir) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    env = ArithmeticEnv(EnvConfig(), tokenizer=tok)
    text = tok.decode(env.prompt_ids(make_item("1+1")))
    assert text.startswith("<|im_start|>user") and "What is 1+1?" in text


def test_vllm_down_is_retried_then_given_up() -> None:
    env = ArithmeticEnv(EnvConfig(vllm_url=f"http://127.0.0.1:{free_port()}",
                                  model_name="m", vllm_retry_timeout=1.0),
                        tokenizer=FakeTokenizer())
    with pytest.raises(VLLMUnavailable, match="unreachable"):
        env.sample([1, 2, 3], max_tokens=4)
    assert env.stats.retried >= 1


class RunApiStandIn(threading.Thread):
    """A real HTTP server with run-api's gap: 404 for POST /weight_version and
    /training_finished (atroposlib 0.4.0 has neither); counts the posts it gets."""

    def __init__(self) -> None:
        import http.server
        posts: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b'{"detail":"Not Found"}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.posts = posts
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        super().__init__(target=self.server.serve_forever, daemon=True)


def test_trainer_warns_once_when_the_api_lacks_weight_version_and_finish(caplog) -> None:
    from example_trainer.api import TrajectoryClient
    server = RunApiStandIn()
    server.start()
    try:
        client = TrajectoryClient(server.url, request_timeout=5)
        with caplog.at_level("WARNING"):
            for version in range(3):
                client.publish_weight_version(version)    # no exception: run-api lacks it
            client.finish("completed")
            client.finish("completed")
    finally:
        server.server.shutdown()
    assert server.posts == ["/weight_version", "/training_finished"]   # each tried once
    warned = [r.getMessage() for r in caplog.records if "not sent again" in r.getMessage()]
    assert len(warned) == 2 and "/weight_version" in warned[0]


def test_cli_parses_common_and_task_flags() -> None:
    from environments.arithmetic import build_parser
    from environments.base import config_from_args
    args = build_parser().parse_args(
        ["--api-url", "http://h:1", "--vllm-url", "http://h:2", "--model-name", "lora-3",
         "--tokenizer", "/tmp/tok", "--group-size", "4", "--temperature", "0.8",
         "--max-tokens", "32", "--seed", "9", "--difficulty", "3", "--no-include-messages",
         "--max-groups", "5"])
    cfg = config_from_args(args)
    assert (cfg.api_url, cfg.vllm_url, cfg.model_name, cfg.tokenizer) == \
        ("http://h:1", "http://h:2", "lora-3", "/tmp/tok")
    assert (cfg.group_size, cfg.temperature, cfg.max_tokens, cfg.seed, cfg.max_groups) == \
        (4, 0.8, 32, 9, 5)
    assert cfg.include_messages is False and cfg.desired_name == "arithmetic"
    assert args.difficulty == 3 and not args.eval_only


# ------------------------------------------------------------------------------------------
# Protocol with the real trajectory API (no vLLM)
# ------------------------------------------------------------------------------------------

def start_trainer(api: str, batch_size: int, max_token_len: int = 256) -> None:
    """Register a trainer and poll /batch once, which opens registration to environments."""
    requests.post(f"{api}/register", json={"batch_size": batch_size,
                                           "max_token_len": max_token_len,
                                           "num_steps": 100}, timeout=5).raise_for_status()
    requests.get(f"{api}/batch", timeout=5).raise_for_status()


def fake_group(env: Environment, scores: tuple[float, ...] = (1.0, 0.0)) -> dict[str, Any]:
    completions = [Completion([9, 10 + i], [-0.3, -0.4], str(i)) for i in range(len(scores))]
    return build_scored_group([1, 2, 3], completions, scores, temperature=1.0,
                              env_id=env.env_id)


def run_in_thread(fn, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as err:  # surfaced by the test that reads result
            result["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def poll_batch(api: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = requests.get(f"{api}/batch", timeout=5).json()["batch"]
        if batch:
            return batch
        time.sleep(0.1)
    raise AssertionError("no batch arrived")


def test_register_waits_for_the_trainer(api_url: str) -> None:
    env = ArithmeticEnv(EnvConfig(api_url=api_url, group_size=2))
    thread, result = run_in_thread(env.register)
    time.sleep(0.5)
    assert thread.is_alive() and env.env_id is None   # still "wait for trainer to start"
    start_trainer(api_url, batch_size=4)
    thread.join(30)
    assert result.get("value") is True and env.env_id is not None
    env.disconnect()


def test_register_after_training_finished_returns_false(api_url: str) -> None:
    start_trainer(api_url, batch_size=4)
    requests.post(f"{api_url}/training_finished", json={"reason": "test"}, timeout=5)
    env = ArithmeticEnv(EnvConfig(api_url=api_url, group_size=2), tokenizer=FakeTokenizer())
    assert env.register() is False
    assert env.run().posted == 0


def test_backpressure_waits_until_the_trainer_takes_a_batch(api_url: str) -> None:
    start_trainer(api_url, batch_size=2)
    env = ArithmeticEnv(EnvConfig(api_url=api_url, group_size=2, max_queued_groups=1,
                                  poll_interval=0.05))
    assert env.register()
    assert env.wait_for_room() is True
    assert env.post_group(fake_group(env))
    thread, result = run_in_thread(env.wait_for_room)
    time.sleep(0.5)
    assert thread.is_alive()                      # one group queued = the limit
    assert len(poll_batch(api_url)) == 1
    thread.join(30)
    assert result.get("value") is True
    # A finished run ends the wait instead of sampling more.
    env.post_group(fake_group(env))
    thread, result = run_in_thread(env.wait_for_room)
    requests.post(f"{api_url}/training_finished", json={"reason": "test"}, timeout=5)
    thread.join(30)
    assert result.get("value") is False
    env.disconnect()


def test_full_queue_429_is_retried_not_dropped() -> None:
    port = free_port()
    proc = start_api_server(port, "--max-queue-sequences", "2")
    api = f"http://127.0.0.1:{port}"
    try:
        start_trainer(api, batch_size=2)
        env = ArithmeticEnv(EnvConfig(api_url=api, group_size=2))
        assert env.register()
        assert env.post_group(fake_group(env, (1.0, 0.0)))
        thread, result = run_in_thread(env.post_group, fake_group(env, (0.0, 1.0)))
        deadline = time.monotonic() + 30
        while env.stats.post_waits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.stats.post_waits >= 1 and thread.is_alive()   # got 429, waiting
        assert poll_batch(api)[0]["scores"] == [1.0, 0.0]
        thread.join(30)
        assert result.get("value") is True and env.stats.posted == 2
        assert poll_batch(api)[0]["scores"] == [0.0, 1.0]
        env.disconnect()
    finally:
        stop_process_group(proc)


# ------------------------------------------------------------------------------------------
# End to end: real trajectory API + real vLLM on the tiny random model
# ------------------------------------------------------------------------------------------

class ParityEnv(ArithmeticEnv):
    """A random tiny model is almost never right; score text-length parity instead, so
    groups have varied scores and are not all dropped as signal-free."""

    def score(self, item: Item, completion_text: str) -> float:
        return float(len(completion_text) % 2)


class LongParityEnv(ParityEnv):
    """Never stops at EOS, so a generation is surely long; flags when it starts sampling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampling = threading.Event()

    def _completion_request(self, prompts: list[list[int]], **kwargs: Any) -> dict[str, Any]:
        self.sampling.set()
        return {**super()._completion_request(prompts, **kwargs), "ignore_eos": True,
                "stop_token_ids": []}


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    from example_trainer.vllm.server import VLLMServer
    server = VLLMServer(tiny_model_dir, port=free_port(), served_model_name="tiny",
                        enforce_eager=True, dev_mode=True, kv_cache_gib=1, max_model_len=1024)
    server.start()
    yield server
    server.stop()


def e2e_config(api: str, server: Any, model_dir: Any, **overrides: Any) -> EnvConfig:
    values = dict(api_url=api, vllm_url=server.url, model_name="tiny",
                  tokenizer=str(model_dir), group_size=4, max_tokens=16, temperature=0.9,
                  max_token_length=1024, poll_interval=0.1, vllm_retry_timeout=300)
    return EnvConfig(**{**values, **overrides})


def check_group_alignment(env: Environment, group: dict[str, Any], max_tokens: int) -> int:
    """Prompt ids re-derived from the group's own messages; returns the prompt length."""
    prompt = env.prompt_ids(Item(messages=group["messages"][0][:-1]))
    n = len(prompt)
    for tokens, masks, lps in zip(group["tokens"], group["masks"],
                                  group["inference_logprobs"]):
        assert len(tokens) == len(masks) == len(lps)
        assert tokens[:n] == prompt and 1 <= len(tokens) - n <= max_tokens
        assert masks[:n] == [-100] * n and masks[n:] == tokens[n:]
        assert lps[:n] == [1.0] * n
        assert all(math.isfinite(x) and x <= 0.0 for x in lps[n:])
    return n


@pytest.mark.slow
def test_environment_end_to_end(api_url: str, vllm_server, tiny_model_dir) -> None:
    start_trainer(api_url, batch_size=4, max_token_len=1024)
    env = ParityEnv(e2e_config(api_url, vllm_server, tiny_model_dir))
    stats = env.run(max_groups=2)
    assert stats.posted == 2 and stats.groups_sampled == 2 + stats.dropped_equal
    assert stats.rejected == 0 and stats.retried == 0
    for _ in range(2):
        batch = poll_batch(api_url)
        assert len(batch) == 1
        group = batch[0]
        check_group_alignment(env, group, max_tokens=16)
        assert group["generation_params"] == {"temperature": 0.9}
        assert len(set(group["scores"])) > 1
        assert group["messages"][0][-1]["role"] == "assistant"
    # The runner disconnected on exit.
    assert requests.get(f"{api_url}/status-env", params={"env_id": 0}, timeout=5).status_code \
        == 404
    # Held-out evaluation: batched prompts, one greedy completion each.
    env.config.eval_batch_size = 4
    accuracy = env.evaluate(env.eval_items(10, seed=1), temperature=0.0, max_tokens=8)
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_environment_stops_when_training_finishes(api_url: str, vllm_server,
                                                  tiny_model_dir) -> None:
    start_trainer(api_url, batch_size=4, max_token_len=1024)
    env = ParityEnv(e2e_config(api_url, vllm_server, tiny_model_dir, max_queued_groups=2,
                               concurrency=2))
    thread, result = run_in_thread(env.run)
    deadline = time.monotonic() + 300
    while env.stats.posted < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert env.stats.posted >= 2      # the queue is at its limit: back-pressure holds the env
    requests.post(f"{api_url}/training_finished", json={"reason": "test"},
                  timeout=5).raise_for_status()
    thread.join(300)
    assert not thread.is_alive() and "error" not in result, result
    assert env.stats.posted <= 4      # limit 2 groups, plus one in flight per worker


@pytest.mark.slow
def test_aborted_generation_is_retried(api_url: str, vllm_server, tiny_model_dir) -> None:
    start_trainer(api_url, batch_size=4, max_token_len=1024)
    # Long generations (EOS ignored), so a pause has time to land while they run: with 300
    # tokens a loaded CI machine once saw the group finish between two pauses, never retried.
    length = 800
    env = LongParityEnv(e2e_config(api_url, vllm_server, tiny_model_dir, max_tokens=length))
    thread, result = run_in_thread(env.run, 1)
    assert env.sampling.wait(300)
    # A pause that lands before the request reaches vLLM only queues it (vLLM 0.32), so
    # pause again until one lands while it generates (vLLM's running gauge can be stale).
    for attempt in range(40):
        if env.stats.retried or env.stats.posted or not thread.is_alive():
            break
        time.sleep(0.3 if attempt == 0 else 0.05)
        requests.post(f"{vllm_server.url}/pause", params={"mode": "abort"},
                      timeout=30).raise_for_status()
        try:
            deadline = time.monotonic() + 5
            while not env.stats.retried and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            requests.post(f"{vllm_server.url}/resume", timeout=30).raise_for_status()
    thread.join(300)
    assert not thread.is_alive() and "error" not in result, result
    assert env.stats.retried >= 1 and env.stats.posted == 1, env.stats
    group = poll_batch(api_url)[0]
    prompt_len = check_group_alignment(env, group, max_tokens=length)
    lengths = [len(t) - prompt_len for t in group["tokens"]]
    assert lengths == [length] * 4, lengths   # the retried, complete group; not a partial one


@pytest.mark.slow
def test_unserved_model_name_fails_naming_the_served_ones(api_url: str, vllm_server,
                                                          tiny_model_dir) -> None:
    start_trainer(api_url, batch_size=4, max_token_len=1024)
    env = ParityEnv(e2e_config(api_url, vllm_server, tiny_model_dir, model_name="policy",
                               model_name_grace=1.0))
    with pytest.raises(ModelNotServed, match=r"serves 'tiny' but not 'policy'"):
        env.run(max_groups=1)
    assert env.stats.posted == 0 and env.stats.retried >= 1


@pytest.mark.slow
def test_cli_eval_only_runs_as_its_own_process(vllm_server, tiny_model_dir) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "environments.arithmetic", "--eval-only", "--eval-n", "6",
         "--vllm-url", vllm_server.url, "--tokenizer", str(tiny_model_dir),
         "--max-tokens", "8", "--eval-batch-size", "4"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"accuracy [01]\.\d{4} on 6 held-out problems", proc.stderr)
