"""The trajectory API server (environments/api_server/), run as a real subprocess.

Groups carry their identity in their tokens (first token = group tag, second = sequence index),
so every test can check which sequences came back, in what order, and that none were lost.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from conftest import REPO, free_port, start_api_server, stop_process_group

MAX_QUEUE = 64


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """One real server for the module, with a small queue limit to exercise back-pressure."""
    port = free_port()
    proc = start_api_server(port, "--max-queue-sequences", str(MAX_QUEUE),
                            log_path=tmp_path_factory.mktemp("api") / "server.log")
    yield f"http://127.0.0.1:{port}", port
    stop_process_group(proc)


@pytest.fixture()
def url(server: tuple[str, int]) -> str:
    """The server's base URL, with all state reset before the test."""
    base = server[0]
    assert get(base, "/reset_data") == {"status": "reset"}
    return base


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def get(url: str, path: str, **kwargs: Any) -> Any:
    response = requests.get(url + path, timeout=5, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def post_raw(url: str, path: str, body: Any) -> requests.Response:
    """POST JSON allowing NaN/inf literals, which requests' json= refuses to encode."""
    return requests.post(url + path, data=json.dumps(body), timeout=5,
                         headers={"Content-Type": "application/json"})


def post(url: str, path: str, body: Any = None) -> Any:
    response = post_raw(url, path, body if body is not None else {})
    assert response.status_code == 200, response.text
    return response.json()


def make_group(tag: int, size: int, *, env_id: int | None = None, length: int = 4,
               scores: list[float] | None = None) -> dict[str, Any]:
    """Sequence i of group `tag` is [tag, i, 100+tag, 200+i, ...]; the first two are prompt."""
    tokens = [[tag, i] + [100 + tag, 200 + i] + [300] * (length - 4) for i in range(size)]
    return {
        "tokens": tokens,
        "masks": [[-100, -100] + seq[2:] for seq in tokens],
        "scores": scores if scores is not None else [float(i % 2) for i in range(size)],
        "inference_logprobs": [[1.0, 1.0] + [-0.5] * (length - 2) for _ in range(size)],
        "messages": [[{"role": "user", "content": f"g{tag}s{i}"}] for i in range(size)],
        "overrides": [{"seq": i} for i in range(size)],
        "generation_params": {"temperature": 0.7},
        "env_id": env_id,
        "custom_field": f"extra-{tag}",
    }


def register(url: str, batch_size: int, max_token_len: int = 64, **extra: Any) -> str:
    body = {"batch_size": batch_size, "max_token_len": max_token_len, "num_steps": 10,
            "checkpoint_dir": "/tmp/ckpt", "save_checkpoint_interval": 5,
            "wandb_group": "grp", "wandb_project": "proj", **extra}
    return post(url, "/register", body)["uuid"]


def register_env(url: str, name: str = "arith", group_size: int = 2,
                 weight: float = 1.0) -> dict[str, Any]:
    return post(url, "/register-env", {"max_token_length": 64, "desired_name": name,
                                       "weight": weight, "group_size": group_size})


def start_with_env(url: str, batch_size: int, **extra: Any) -> int:
    """Register a trainer, make its first /batch poll, register one environment."""
    register(url, batch_size, **extra)
    assert get(url, "/batch") == {"batch": None}
    answer = register_env(url)
    assert answer["status"] == "success", answer
    return answer["env_id"]


def tags(batch: list[dict[str, Any]]) -> list[int]:
    return [group["tokens"][0][0] for group in batch]


def sequence_ids(batch: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(seq[0], seq[1]) for group in batch for seq in group["tokens"]]


def queue_size(url: str) -> int:
    return get(url, "/status")["queue_size"]


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def test_register_sets_info_step_and_replaces_config(url: str) -> None:
    assert get(url, "/info") == {"batch_size": -1, "max_token_len": -1}
    uuid = register(url, 4, max_token_len=128, starting_step=5)
    assert isinstance(uuid, str) and uuid
    assert get(url, "/info") == {"batch_size": 4, "max_token_len": 128}
    assert get(url, "/wandb_info") == {"group": "grp", "project": "proj"}
    assert get(url, "/status")["current_step"] == 5

    assert register(url, 6, max_token_len=32, starting_step=2) != uuid
    assert get(url, "/info") == {"batch_size": 6, "max_token_len": 32}
    assert get(url, "/status")["current_step"] == 2


def test_register_env_waits_for_first_batch(url: str) -> None:
    assert register_env(url) == {"status": "wait for trainer to start"}
    register(url, 4, starting_step=3)
    assert register_env(url) == {"status": "wait for trainer to start"}
    assert get(url, "/batch") == {"batch": None}

    first = register_env(url, name="arith")
    assert first == {"status": "success", "env_id": 0, "wandb_name": "arith_0",
                     "checkpoint_dir": "/tmp/ckpt", "starting_step": 3,
                     "checkpoint_interval": 5, "num_steps": 10}
    second = register_env(url, name="gsm")
    assert (second["env_id"], second["wandb_name"]) == (1, "gsm_1")

    assert post(url, "/disconnect-env", {"env_id": 0}) == {"status": "success"}
    again = post_raw(url, "/disconnect-env", {"env_id": 0})
    assert again.status_code == 404 and "env_id 0" in again.json()["detail"]
    gone = requests.get(f"{url}/status-env", params={"env_id": 0}, timeout=5)
    assert gone.status_code == 404


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def test_batches_are_exact_and_oldest_first(url: str) -> None:
    env_id = start_with_env(url, 4)
    post(url, "/scored_data", make_group(0, 2, env_id=env_id))
    assert post(url, "/scored_data", make_group(1, 2)) == {"status": "received"}
    answer = post(url, "/scored_data_list", [make_group(t, 2) for t in range(2, 6)])
    assert answer["status"] == "received" and answer["groups"] == 4
    assert queue_size(url) == 12
    assert get(url, "/latest_example")["tokens"][0][0] == 5

    batches = [get(url, "/batch")["batch"] for _ in range(3)]
    assert [tags(b) for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert all(sum(len(g["tokens"]) for g in b) == 4 for b in batches)
    # Groups come back as posted: every field, unknown ones and env_id included.
    first = batches[0][0]
    posted = make_group(0, 2, env_id=env_id)
    for key, value in posted.items():
        assert first[key] == value, key
    assert get(url, "/batch") == {"batch": None}
    assert get(url, "/status")["current_step"] == 3
    assert queue_size(url) == 0


def test_mixed_group_sizes_pack_exactly_in_queue_order(url: str) -> None:
    start_with_env(url, 8)
    sizes = [5, 4, 4, 3, 2, 6, 1, 7]
    post(url, "/scored_data_list", [make_group(t, s) for t, s in enumerate(sizes)])
    batches = []
    while (batch := get(url, "/batch")["batch"]) is not None:
        assert sum(len(g["tokens"]) for g in batch) == 8
        batches.append(tags(batch))
    # Earliest exact subset each time: 5+3 first (the 4s cannot complete a 5), then 4+4, ...
    assert batches == [[0, 3], [1, 2], [4, 5], [6, 7]]
    assert queue_size(url) == 0


def test_split_fallback_keeps_whole_group_statistics(url: str) -> None:
    start_with_env(url, 8)
    score_sets = {t: [0.0, 1.0, 0.5 * t] for t in range(8)}
    posted = {t: make_group(t, 3, scores=score_sets[t]) for t in range(8)}
    post(url, "/scored_data_list", [posted[t] for t in range(4)])

    first = get(url, "/batch")["batch"]
    assert sequence_ids(first) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0),
                                   (2, 1)]
    part = first[2]
    scores = score_sets[2]
    assert part["group_overrides"] == {"group_score_mean": statistics.fmean(scores),
                                       "group_score_std": statistics.pstdev(scores),
                                       "split_of": 3}
    # Every per-sequence field is sliced the same way.
    assert part["scores"] == scores[:2]
    assert part["masks"] == posted[2]["masks"][:2]
    assert part["inference_logprobs"] == posted[2]["inference_logprobs"][:2]
    assert part["overrides"] == [{"seq": 0}, {"seq": 1}]
    assert [m[0]["content"] for m in part["messages"]] == ["g2s0", "g2s1"]
    assert "group_overrides" not in first[0] or first[0]["group_overrides"] is None
    assert queue_size(url) == 4 and get(url, "/batch") == {"batch": None}

    post(url, "/scored_data_list", [posted[4], posted[5]])
    second = get(url, "/batch")["batch"]
    assert tags(second) == [2, 3, 4, 5]
    assert second[0]["group_overrides"]["split_of"] == 3
    assert second[0]["scores"] == [scores[2]]
    assert second[0]["overrides"] == [{"seq": 2}]
    assert second[3]["group_overrides"]["group_score_mean"] == statistics.fmean(score_sets[5])
    assert len(second[3]["tokens"]) == 1

    post(url, "/scored_data_list", [posted[6], posted[7]])
    third = get(url, "/batch")["batch"]
    assert tags(third) == [5, 6, 7]
    served = sequence_ids(first) + sequence_ids(second) + sequence_ids(third)
    assert sorted(served) == [(t, i) for t in range(8) for i in range(3)]
    assert queue_size(url) == 0


def test_group_passed_over_twice_goes_out_next(url: str) -> None:
    start_with_env(url, 8)
    post(url, "/scored_data_list", [make_group(0, 3), make_group(1, 4), make_group(2, 4)])
    assert tags(get(url, "/batch")["batch"]) == [1, 2]
    post(url, "/scored_data_list", [make_group(3, 4), make_group(4, 4)])
    assert tags(get(url, "/batch")["batch"]) == [3, 4]
    post(url, "/scored_data_list", [make_group(5, 4), make_group(6, 4)])
    # Group 0 has waited through two batches: this one is filled oldest first instead.
    batch = get(url, "/batch")["batch"]
    assert sequence_ids(batch) == [(0, 0), (0, 1), (0, 2), (5, 0), (5, 1), (5, 2), (5, 3),
                                   (6, 0)]
    assert queue_size(url) == 3


# ---------------------------------------------------------------------------------------------
# Back-pressure, reset, status, end of training
# ---------------------------------------------------------------------------------------------

def test_full_queue_answers_429_and_keeps_everything(url: str) -> None:
    start_with_env(url, 8)
    post(url, "/scored_data_list", [make_group(t, 4) for t in range(15)])
    assert queue_size(url) == 60

    full = post_raw(url, "/scored_data", make_group(15, 8))
    assert full.status_code == 429
    assert full.headers["Retry-After"] == "1"
    assert "60" in full.json()["detail"] and str(MAX_QUEUE) in full.json()["detail"]
    partial = post_raw(url, "/scored_data_list", [make_group(15, 4), make_group(16, 4)])
    assert partial.status_code == 429  # all or nothing: the first group was not queued
    assert queue_size(url) == 60
    too_big = post_raw(url, "/scored_data_list", [make_group(t, 8) for t in range(9)])
    assert too_big.status_code == 422 and "max_queue_sequences" in too_big.text

    post(url, "/scored_data", make_group(15, 4))
    assert queue_size(url) == MAX_QUEUE
    assert tags(get(url, "/batch")["batch"]) == [0, 1]
    post(url, "/scored_data", make_group(16, 8))
    served = [tags(get(url, "/batch")["batch"]) for _ in range(8)]
    assert served[-1] == [16]
    assert queue_size(url) == 0


def test_reset_clears_everything_and_new_register_takes_effect(url: str) -> None:
    env_id = start_with_env(url, 4)
    post(url, "/scored_data_list", [make_group(0, 2, env_id=env_id), make_group(1, 2),
                                    make_group(2, 2)])
    get(url, "/batch")
    post(url, "/training_finished", {"reason": "test"})
    instance = get(url, "/status")["instance_id"]

    assert get(url, "/reset_data") == {"status": "reset"}
    status = get(url, "/status")
    assert status.pop("instance_id") != instance  # a registered trainer sees it, registers again
    assert status == {"current_step": 0, "queue_size": 0, "queued_sequences": 0,
                      "queued_groups": 0, "training_finished": False, "weight_version": None,
                      "max_queue_sequences": MAX_QUEUE}
    assert get(url, "/info")["batch_size"] == -1
    assert get(url, "/latest_example") == {}
    response = requests.get(f"{url}/batch", timeout=5)
    assert response.status_code == 200 and response.json() == {"batch": None}
    assert register_env(url) == {"status": "wait for trainer to start"}
    stale = post_raw(url, "/scored_data", make_group(3, 2, env_id=env_id))
    assert stale.status_code == 422 and "env_id" in stale.text

    register(url, 2, starting_step=7)
    assert get(url, "/info")["batch_size"] == 2
    assert get(url, "/status")["current_step"] == 7
    post(url, "/scored_data_list", [make_group(4, 2), make_group(5, 2)])
    assert tags(get(url, "/batch")["batch"]) == [4]
    assert get(url, "/status")["current_step"] == 8
    assert register_env(url)["env_id"] == 0


def test_status_env_by_query_and_by_body(url: str) -> None:
    env_id = start_with_env(url, 8)
    other = register_env(url, name="other", weight=0.25)["env_id"]
    post(url, "/scored_data_list", [make_group(0, 2, env_id=env_id), make_group(1, 3),
                                    make_group(2, 2, env_id=env_id),
                                    make_group(3, 1, env_id=other)])
    by_query = get(url, "/status-env", params={"env_id": env_id})
    by_body = get(url, "/status-env", json={"env_id": env_id})
    assert by_query == by_body
    # queue_size in groups of this environment's size, as Atropos' run-api counts it.
    assert (by_query["env_queue_size"], by_query["queued_sequences"]) == (4, 8)
    assert (by_query["queue_size"], by_query["queued_groups"]) == (4, 4)
    assert (by_query["env_weight"], by_query["training_finished"]) == (1.0, False)
    assert by_query["current_step"] == 0
    theirs = get(url, "/status-env", params={"env_id": other})
    assert (theirs["env_queue_size"], theirs["env_weight"]) == (1, 0.25)

    missing = requests.get(f"{url}/status-env", timeout=5)
    assert missing.status_code == 422 and "env_id" in missing.text
    unknown = requests.get(f"{url}/status-env", json={"env_id": 42}, timeout=5)
    assert unknown.status_code == 404 and "env_id 42" in unknown.text


def test_training_finished_is_an_explicit_signal(url: str) -> None:
    env_id = start_with_env(url, 2)
    post(url, "/scored_data", make_group(0, 2, env_id=env_id))
    assert get(url, "/status")["training_finished"] is False

    assert post(url, "/training_finished", {"reason": "done"})["status"] == "finished"
    assert get(url, "/status")["training_finished"] is True
    assert get(url, "/status-env", params={"env_id": env_id})["training_finished"] is True
    assert get(url, "/batch") == {"batch": None}
    assert register_env(url) == {"status": "finished"}
    late = post_raw(url, "/scored_data", make_group(1, 2, env_id=env_id))
    assert late.status_code == 409 and "finished" in late.json()["detail"]
    late_list = post_raw(url, "/scored_data_list", [make_group(2, 2)])
    assert late_list.status_code == 409
    assert queue_size(url) == 2

    # The body is optional.
    response = requests.post(f"{url}/training_finished", timeout=5)
    assert response.status_code == 200


def test_busy_port_is_one_clear_error_with_exit_code_2(server: tuple[str, int]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "environments.api_server", "--port", str(server[1])],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0] and str(server[1]) in lines[0]


# ---------------------------------------------------------------------------------------------
# Validation: every malformed post is a 422 naming field and index, and changes nothing
# ---------------------------------------------------------------------------------------------

def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(group: dict[str, Any]) -> None:
        target = group
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop_last(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda group: group[field].pop()


def _long_sequence(group: dict[str, Any]) -> None:
    group.update({k: v for k, v in make_group(9, 4, length=20).items()
                  if k in ("tokens", "masks", "inference_logprobs")})


BAD_POSTS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("masks count", _drop_last("masks"), "masks has 3 entries but tokens has 4"),
    ("scores count", lambda g: g["scores"].append(1.0), "scores has 5 entries but tokens has 4"),
    ("mask length", lambda g: g["masks"][1].pop(), "masks[1] has 3 entries but tokens[1] has 4"),
    ("mask value", _set(("masks", 1, 3), 999), "masks[1][3] is 999"),
    ("nan score", _set(("scores", 2), float("nan")), "scores[2] is not finite (nan)"),
    ("inf score", _set(("scores", 0), float("inf")), "scores[0] is not finite (inf)"),
    ("negative token", _set(("tokens", 0, 0), -5), "tokens[0][0] is a negative token id"),
    ("string token", _set(("tokens", 0, 1), "a"), "tokens[0][1]"),
    ("string score", _set(("scores", 1), "high"), "scores[1]"),
    ("empty tokens", lambda g: g.update(tokens=[], masks=[], scores=[]), "tokens is empty"),
    ("empty sequence", lambda g: g.update(tokens=[[]] + g["tokens"][1:],
                                          masks=[[]] + g["masks"][1:]), "tokens[0] is empty"),
    ("missing masks", lambda g: g.pop("masks"), "masks: Field required"),
    ("inference_logprobs length", lambda g: g["inference_logprobs"][2].pop(),
     "inference_logprobs[2] has 3 entries but tokens[2] has 4"),
    ("advantages nan", lambda g: g.update(advantages=[[0.0, float("nan"), 0.0, 0.0]] * 4),
     "advantages[0][1] is not finite"),
    ("advantages count", lambda g: g.update(advantages=[[0.0] * 4]),
     "advantages has 1 entries but tokens has 4"),
    ("group bigger than batch", lambda g: g.update(make_group(9, 9)), "batch_size 8"),
    ("sequence too long", _long_sequence, "tokens[0] has 20 tokens, more than the trainer's "
                                          "max_token_len 16"),
    ("unknown env_id", _set(("env_id",), 99), "env_id 99 is not a registered environment"),
    ("overrides count", _drop_last("overrides"), "overrides has 3 entries but tokens has 4"),
    ("nothing to train", _set(("masks", 2), [-100] * 4), "masks[2] has no trained token"),
    ("nan in generation_params", _set(("generation_params", "temperature"), float("nan")),
     "generation_params.temperature is not finite"),
]


@pytest.mark.parametrize("mutate, expected", [case[1:] for case in BAD_POSTS],
                         ids=[case[0] for case in BAD_POSTS])
def test_malformed_post_is_422_and_changes_nothing(
        url: str, mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    env_id = start_with_env(url, 8, max_token_len=16)
    good = [make_group(0, 4, env_id=env_id), make_group(1, 4, env_id=env_id)]
    post(url, "/scored_data", good[0])
    before = get(url, "/status")

    bad = make_group(5, 4, env_id=env_id)
    mutate(bad)
    for path, body in (("/scored_data", bad), ("/scored_data_list", [make_group(6, 2), bad])):
        response = post_raw(url, path, body)
        assert response.status_code == 422, response.text
        assert expected in response.json()["detail"], response.text
        if path == "/scored_data_list":
            assert "groups[1]" in response.json()["detail"]
        assert get(url, "/status") == before
    assert get(url, "/latest_example")["tokens"][0][0] == 0

    post(url, "/scored_data", good[1])
    batch = get(url, "/batch")["batch"]
    assert [{k: g[k] for k in ("tokens", "masks", "scores", "env_id")} for g in batch] == \
        [{k: g[k] for k in ("tokens", "masks", "scores", "env_id")} for g in good]
    assert queue_size(url) == 0


def test_groups_posted_before_any_trainer_are_accepted_and_split_to_fit(url: str) -> None:
    post(url, "/scored_data", make_group(0, 6))  # no trainer yet: no batch_size to check
    register(url, 4)
    batch = get(url, "/batch")["batch"]
    assert sequence_ids(batch) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert batch[0]["group_overrides"]["split_of"] == 6
    assert math.isclose(batch[0]["group_overrides"]["group_score_mean"], 0.5)
    assert queue_size(url) == 2


def test_weight_version_is_published_and_rollout_staleness_measured(url: str) -> None:
    from example_trainer.api import BatchFetcher, TrajectoryClient
    fetcher = BatchFetcher(TrajectoryClient(url), batch_size=4, max_token_len=64,
                           num_steps=3, pad_id=0)
    assert get(url, "/status")["weight_version"] is None
    fetcher.publish_weight_version(5)
    assert get(url, "/status")["weight_version"] == 5
    assert post_raw(url, "/weight_version", {"version": -1}).status_code == 422
    assert post_raw(url, "/weight_version", {"version": "6"}).status_code == 422
    assert get(url, "/status")["weight_version"] == 5
    # Two groups sampled under versions 3 and 5 (the tag survives the queue unchanged).
    post(url, "/scored_data_list", [make_group(0, 2) | {"weight_version": 3},
                                    make_group(1, 2) | {"weight_version": 5}])
    fetcher.next_batch()
    assert fetcher.last.weight_versions == [3, 5]
    metrics = fetcher.metrics()
    assert metrics["data/staleness_max"] == 2.0
    assert metrics["data/staleness_mean"] == 1.0
    # Untagged groups (an environment that doesn't read the version): no staleness figure.
    post(url, "/scored_data_list", [make_group(2, 2), make_group(3, 2)])
    fetcher.next_batch()
    assert "data/staleness_max" not in fetcher.metrics()
