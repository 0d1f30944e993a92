"""Bad input to the API server and the trainer: each is refused clearly and harms nothing.

The API table posts malformed payloads to the real server. Each must be answered with a 4xx
whose message names the problem, and the queue must be untouched: a good group posted before
the table is still queued afterwards and is served by /batch, next to one posted after.
Token ids beyond the model's vocabulary are the trainer's to catch (the server does not know
the vocabulary): a real BatchFetcher rejects such a group and counts it.

Bad command lines must fail before anything starts: exit 2, one line naming the flag and the
fix, within a second, and no connection to the API (a listening socket counts them).
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from conftest import REPO, free_port, start_api_server, stop_process_group

BATCH, MAX_LEN, MAX_MB = 4, 64, 1


def group(tag: int, n: int = 2, **changes: Any) -> dict[str, Any]:
    """A valid group of n sequences whose first token is its tag."""
    tokens = [[tag, 10 + i, 20, 21] for i in range(n)]
    body = {"tokens": tokens, "masks": [[-100, -100, 20, 21] for _ in range(n)],
            "scores": [float(i) for i in range(n)],
            "inference_logprobs": [[1.0, 1.0, -0.5, -0.7] for _ in range(n)]}
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_api_server(port, "--max-queue-sequences", "64", "--max-request-mb",
                            str(MAX_MB), log_path=tmp_path_factory.mktemp("api") / "api.log")
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)


@pytest.fixture()
def url(server: str) -> str:
    """Reset; a trainer (batch 4, max 64 tokens) and one environment (env_id 0) registered."""
    assert requests.get(f"{server}/reset_data", timeout=5).status_code == 200
    assert requests.post(f"{server}/register", json={"batch_size": BATCH,
                                                     "max_token_len": MAX_LEN},
                         timeout=5).status_code == 200
    assert requests.get(f"{server}/batch", timeout=5).json() == {"batch": None}
    env = requests.post(f"{server}/register-env", json={
        "max_token_length": MAX_LEN, "desired_name": "t", "group_size": 2}, timeout=5).json()
    assert env["env_id"] == 0
    return server


def raw(body: str) -> bytes:
    return body.encode()


def js(value: Any) -> bytes:
    """JSON allowing NaN/Infinity literals (what Python clients send when they slip)."""
    return json.dumps(value).encode()


BIG = js([group(1)] * 8000)  # about 1.6 MB > the 1 MiB limit
BOMB = gzip.compress(b" " * (3 << 20) + js(group(1)))  # 3 MiB of spaces: 3 KB compressed

# (case id, path, body, extra headers, status, text the message must contain)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("tokens-not-a-list", "/scored_data", js(group(1, tokens="abc")), {}, 422, "tokens"),
    ("token-id-string", "/scored_data",
     js(group(1, tokens=[[1, "x", 3, 4], [1, 2, 3, 4]])), {}, 422, "tokens[0][1]"),
    ("token-id-float", "/scored_data",
     js(group(1, tokens=[[1, 2.5, 3, 4], [1, 2, 3, 4]])), {}, 422, "tokens[0][1]"),
    ("token-id-bool", "/scored_data",
     js(group(1, tokens=[[1, True, 3, 4], [1, 2, 3, 4]])), {}, 422, "tokens[0][1]"),
    ("score-string", "/scored_data", js(group(1, scores=["high", 0.0])), {}, 422,
     "scores[0]"),
    ("masks-missing", "/scored_data",
     js({k: v for k, v in group(1).items() if k != "masks"}), {}, 422, "masks"),
    ("scores-count-mismatch", "/scored_data", js(group(1, scores=[1.0, 0.0, 0.5])), {}, 422,
     "scores has 3 entries but tokens has 2"),
    ("mask-length-mismatch", "/scored_data",
     js(group(1, masks=[[-100, -100, 20], [-100, -100, 20, 21]])), {}, 422,
     "masks[0] has 3 entries but tokens[0] has 4"),
    ("nan-score", "/scored_data", js(group(1, scores=[float("nan"), 0.0])), {}, 422,
     "scores[0] is not finite"),
    ("inf-score-1e999", "/scored_data",
     raw(js(group(1)).decode().replace('"scores": [0.0, 1.0]', '"scores": [1e999, 1.0]')),
     {}, 422, "scores[0] is not finite"),
    ("minus-inf-logprob", "/scored_data",
     js(group(1, inference_logprobs=[[1.0, 1.0, float("-inf"), -0.7], [1.0] * 4])), {}, 422,
     "inference_logprobs[0][2] is not finite"),
    ("advantages-length-mismatch", "/scored_data", js(group(1, advantages=[[0.1], [0.2]])),
     {}, 422, "advantages[0] has 1 entries but tokens[0] has 4"),
    ("empty-group", "/scored_data", js(group(1, tokens=[], masks=[], scores=[],
                                             inference_logprobs=None)), {}, 422,
     "tokens is empty"),
    ("empty-sequence", "/scored_data",
     js(group(1, n=1, tokens=[[]], masks=[[]], inference_logprobs=None)), {}, 422,
     "tokens[0] is empty"),
    ("negative-token-id", "/scored_data",
     js(group(1, tokens=[[1, -5, 20, 21], [1, 2, 20, 21]])), {}, 422,
     "tokens[0][1] is a negative token id"),
    ("token-id-beyond-int32", "/scored_data",
     js(group(1, tokens=[[1, 2**40, 20, 21], [1, 2, 20, 21]])), {}, 422,
     "tokens[0][1] is 1099511627776, not a token id"),
    ("mask-value-wrong", "/scored_data",
     js(group(1, masks=[[-100, -100, 5, 21], [-100, -100, 20, 21]])), {}, 422,
     "masks[0][2] is 5"),
    ("nothing-to-train", "/scored_data", js(group(1, masks=[[-100] * 4, [-100] * 4])), {}, 422,
     "masks[0] has no trained token"),
    ("oversize-sequence", "/scored_data",
     js(group(1, n=1, tokens=[[1] * (MAX_LEN + 1)], masks=[[1] * (MAX_LEN + 1)],
              scores=[1.0], inference_logprobs=None)), {}, 422,
     f"more than the trainer's max_token_len {MAX_LEN}"),
    ("group-larger-than-batch", "/scored_data", js(group(1, n=BATCH + 1)), {}, 422,
     f"more than the trainer's batch_size {BATCH}"),
    ("unknown-env-id", "/scored_data", js(group(1, env_id=99)), {}, 422,
     "env_id 99 is not a registered environment"),
    ("nan-inside-messages", "/scored_data",
     js(group(1, messages=[{"role": "user", "score": float("nan")}, None])), {}, 422,
     "messages[0].score is not finite"),
    ("overrides-count-mismatch", "/scored_data", js(group(1, overrides=[{}])), {}, 422,
     "overrides has 1 entries but tokens has 2"),
    ("not-json", "/scored_data", raw("{tokens: [[1,2]]"), {}, 422,
     "request body is not valid JSON"),
    ("empty-body", "/scored_data", b"", {}, 422, "body"),
    ("array-not-object", "/scored_data", js([group(1)]), {}, 422, "valid dictionary"),
    ("list-one-bad-group-queues-none", "/scored_data_list",
     js([group(1), group(2, scores=[0.0]), group(3)]), {}, 422,
     "groups[1]: scores has 1 entries but tokens has 2"),
    ("huge-payload", "/scored_data_list", BIG, {}, 413,
     "request body exceeds the server's limit of 1048576 bytes"),
    ("gzip-bomb", "/scored_data", BOMB, {"Content-Encoding": "gzip"}, 413,
     "decompressed request body exceeds the server's limit"),
    ("invalid-gzip", "/scored_data", b"\x1f\x8b\x08\x00garbage-not-deflate",
     {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("truncated-gzip", "/scored_data", gzip.compress(js(group(1)))[:-12],
     {"Content-Encoding": "gzip"}, 400, "truncated gzip"),
    ("unsupported-encoding", "/scored_data", js(group(1)), {"Content-Encoding": "br"}, 415,
     "Content-Encoding 'br' is not supported"),
    ("status-unknown-env", "/status-env?env_id=42", b"", {}, 404,
     "env_id 42 is not registered"),
    ("disconnect-unknown-env", "/disconnect-env", js({"env_id": 42}), {}, 404,
     "env_id 42 is not registered"),
    ("register-batch-size-zero", "/register", js({"batch_size": 0, "max_token_len": 64}), {},
     422, "batch_size"),
    ("register-env-negative-group", "/register-env",
     js({"max_token_length": 64, "desired_name": "x", "group_size": -1}), {}, 422,
     "group_size"),
]


def test_table_has_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)
    assert len(BIG) > MAX_MB << 20 and len(BOMB) < MAX_MB << 20 < len(gzip.decompress(BOMB))


def test_bad_payloads_are_refused_clearly_and_leave_the_queue_intact(url: str) -> None:
    good = group(7, env_id=0)
    assert requests.post(f"{url}/scored_data", json=good, timeout=5).status_code == 200
    failures = []
    for name, path, body, headers, status, needle in CASES:
        method = requests.get if path.startswith("/status-env") else requests.post
        response = method(url + path, data=body, timeout=30,
                          headers={"Content-Type": "application/json", **headers})
        detail = response.json().get("detail", "") if response.headers.get(
            "content-type", "").startswith("application/json") else response.text
        if response.status_code != status or needle not in str(detail):
            failures.append(f"{name}: {response.status_code} {str(detail)[:200]!r}")
        queued = requests.get(f"{url}/status", timeout=5).json()["queue_size"]
        if queued != 2:
            failures.append(f"{name}: queue_size {queued} after the post, expected 2")
    assert not failures, "\n".join(failures)
    assert requests.get(f"{url}/status-env?env_id=0", timeout=5).status_code == 200

    # A good gzip post still works, and the group queued before the table is served first.
    later = group(8, env_id=0)
    response = requests.post(f"{url}/scored_data", data=gzip.compress(js(later)), timeout=5,
                             headers={"Content-Type": "application/json",
                                      "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    served = requests.get(f"{url}/batch", timeout=5).json()["batch"]
    assert [g["tokens"] for g in served] == [good["tokens"], later["tokens"]]
    assert requests.get(f"{url}/status", timeout=5).json()["queue_size"] == 0


def test_out_of_vocabulary_ids_are_rejected_and_counted_by_the_trainer(url: str) -> None:
    """The server cannot know the model's vocabulary; the fetcher's collation does."""
    from example_trainer.api import BatchFetcher, TrajectoryClient

    bad = group(3, env_id=0, tokens=[[3, 600, 20, 21], [3, 11, 20, 21]])
    good = group(4, env_id=0)
    for body in (bad, good):
        assert requests.post(f"{url}/scored_data", json=body, timeout=5).status_code == 200
    fetcher = BatchFetcher(TrajectoryClient(url), batch_size=BATCH, max_token_len=MAX_LEN,
                           num_steps=1, pad_id=0, vocab_size=500, batch_timeout=10)
    batch = fetcher.next_batch()
    assert batch.size == 2 and batch.input_ids[:, 0].tolist() == [4, 4]  # only the good one
    assert fetcher.rejected_groups == 1
    assert fetcher.rejected_reasons == ["tokens[0] holds id 600 >= vocabulary size 500"]
    assert fetcher.metrics()["data/rejected_groups"] == 1.0


# ---------------------------------------------------------------------------------------------
# Bad command lines: refused before anything starts
# ---------------------------------------------------------------------------------------------

class Listener:
    """A socket standing in for the API: counts every connection a trainer makes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


BAD_FLAGS = [
    (["--steps", "-1"], "--steps must be positive, got -1"),
    (["--steps", "ten"], "--steps: invalid int value: 'ten'"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--model", "/nonexistent/model-dir"], "model directory '/nonexistent/model-dir' does "
     "not exist: pass --model with a directory holding config.json"),
    (["--mode", "shared_vllm", "--lora-rank", "16"], "--lora-rank only applies to modes that "
     "train a LoRA adapter (TRAINS = 'lora': lora_hotswap, lora_nccl or your own), not --mode "
     "shared_vllm, which trains the full model: drop it or choose a LoRA mode"),
    (["--mode", "legacy", "--vllm-url", "http://127.0.0.1:9"], "drop --vllm-url or use "
     "lora_hotswap or lora_nccl"),
    (["--mode", "nosuch"], "invalid --mode 'nosuch': choose from legacy"),
    (["--micro-batch-size", "8", "--batch-size", "4"], "--micro-batch-size (8) exceeds "
     "--batch-size (4)"),
    (["--resume", "/nonexistent/run"], "--resume '/nonexistent/run' does not exist"),
    (["--optimizer", "sgd"], "--optimizer: invalid choice: 'sgd'"),
    (["--eps-low", "1.5"], "clip epsilons must satisfy 0 <= eps_low < 1"),
    (["--save-every", "-2"], "--save-every must be >= 0, got -2"),
    (["--config", "/nonexistent/run.toml"], "config file '/nonexistent/run.toml' not found"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_command_line_fails_fast_with_one_line(flags: list[str], message: str) -> None:
    api = Listener()
    try:
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "example_trainer", "--api-url", api.url,
                              *flags], cwd=REPO, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        api.close()
    assert out.returncode == 2, out.stdout + out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("example-trainer: error: ")
    assert elapsed < 3.0, f"took {elapsed:.1f} s: bad flags must fail before heavy imports"
    assert api.connections == 0, "the API was contacted before the flags were checked"
