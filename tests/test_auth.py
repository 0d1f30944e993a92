"""The shared secret that guards a run's ports off loopback (README, "Security").

The trajectory API runs as a real subprocess: with a secret it answers 401 to every request
without it and changes nothing; without one it refuses a non-loopback address at start-up
(exit 2, one line). The trainer refuses --vllm-host off loopback without a secret the same
way. The one vLLM check (its dev routes guarded too) starts a real server, so it is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from conftest import REPO, free_port, start_api_server, stop_process_group
from environments.transport import API_TOKEN_ENV, bearer_matches, is_loopback

TOKEN = "test-secret-6f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def group(tag: int, size: int = 2) -> dict[str, Any]:
    tokens = [[tag, i, 100 + tag, 200 + i] for i in range(size)]
    return {"tokens": tokens, "masks": [[-100, -100] + seq[2:] for seq in tokens],
            "scores": [float(i % 2) for i in range(size)],
            "inference_logprobs": [[1.0, 1.0, -0.5, -0.5] for _ in range(size)]}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real API server on loopback started with the secret in its environment."""
    port = free_port()
    os.environ[API_TOKEN_ENV] = TOKEN  # the child inherits it; removed before any test runs
    try:
        proc = start_api_server(port, log_path=tmp_path_factory.mktemp("api") / "server.log")
    finally:
        del os.environ[API_TOKEN_ENV]
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)


def status(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/status", headers=AUTH, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def test_requests_without_the_token_get_401_and_change_nothing(secured: str) -> None:
    url = secured
    ok = requests.post(f"{url}/register", headers=AUTH, timeout=5, json={
        "batch_size": 4, "max_token_len": 64, "num_steps": 3, "checkpoint_dir": "",
        "save_checkpoint_interval": 0, "wandb_project": "", "wandb_group": ""})
    assert ok.status_code == 200, ok.text
    assert requests.post(f"{url}/scored_data", json=group(0), headers=AUTH,
                         timeout=5).status_code == 200
    before = status(url)
    assert before["queue_size"] == 2

    wrong = {"Authorization": "Bearer not-the-secret"}
    refused = [
        requests.post(f"{url}/scored_data", json=group(1), timeout=5),
        requests.post(f"{url}/scored_data", json=group(1), headers=wrong, timeout=5),
        requests.post(f"{url}/scored_data_list", json=[group(2)], timeout=5),
        requests.post(f"{url}/scored_data", json=group(1), timeout=5,
                      headers={"Authorization": TOKEN}),  # no "Bearer" scheme
        requests.get(f"{url}/batch", timeout=5),
        requests.get(f"{url}/reset_data", timeout=5),
        requests.post(f"{url}/training_finished", json={"reason": "x"}, timeout=5),
        requests.post(f"{url}/weight_version", json={"version": 9}, timeout=5),
        requests.get(f"{url}/status", timeout=5),
        requests.get(f"{url}/", timeout=5),
    ]
    for response in refused:
        assert response.status_code == 401, (response.request.method, response.url)
        assert response.headers.get("WWW-Authenticate") == "Bearer"
        assert API_TOKEN_ENV in response.json()["detail"]
    after = status(url)
    assert after == before  # same queue, step, version, instance; not finished


def test_both_clients_send_the_token_and_fail_fast_without_it(
        secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from environments.api_client import ApiUnauthorized as EnvUnauthorized
    from environments.api_client import TrajectoryClient as EnvClient
    from environments.config import EnvConfig, EnvStats
    from example_trainer.api import ApiUnauthorized, BatchFetcher, TrajectoryClient

    url = secured
    requests.get(f"{url}/reset_data", headers=AUTH, timeout=5)
    # The trainer's client reads the secret from the environment variable.
    monkeypatch.setenv(API_TOKEN_ENV, TOKEN)
    trainer = TrajectoryClient(url)
    trainer.wait_until_up(5)
    fetcher = BatchFetcher(trainer, batch_size=2, max_token_len=64, num_steps=1, pad_id=0)
    assert trainer.get_batch() == (None, None)  # the first poll: environments may register
    # The environment's client takes it from --api-token (EnvConfig.api_token) as well.
    monkeypatch.delenv(API_TOKEN_ENV)
    env = EnvClient(EnvConfig(api_url=url, api_token=TOKEN), EnvStats(), threading.Lock(),
                    threading.Event())
    assert env.register()
    assert env.post_group(group(3) | {"env_id": env.env_id})
    assert fetcher.next_batch().size == 2

    # Without the secret: one clear error at once, no retrying until a timeout.
    with pytest.raises(ApiUnauthorized, match=API_TOKEN_ENV):
        TrajectoryClient(url).wait_until_up(30)
    with pytest.raises(EnvUnauthorized, match=API_TOKEN_ENV):
        EnvClient(EnvConfig(api_url=url, api_timeout=30), EnvStats(), threading.Lock(),
                  threading.Event()).register()


def test_loopback_server_without_a_secret_asks_for_none(tmp_path) -> None:
    """Atropos' clients send no token: against a loopback server without one they work."""
    port = free_port()
    env_before = os.environ.pop(API_TOKEN_ENV, None)
    try:
        proc = start_api_server(port, log_path=tmp_path / "server.log")
    finally:
        if env_before is not None:
            os.environ[API_TOKEN_ENV] = env_before
    try:
        url = f"http://127.0.0.1:{port}"
        assert requests.post(f"{url}/scored_data", json=group(0), timeout=5).status_code == 200
        assert requests.get(f"{url}/status", timeout=5).json()["queue_size"] == 2
    finally:
        stop_process_group(proc)


def run_module(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != API_TOKEN_ENV}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_api_server_refuses_a_non_loopback_bind_without_a_secret(host: str) -> None:
    done = run_module("environments.api_server", "--host", host, "--port", str(free_port()))
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"refusing to serve the trajectory API on {host}" in lines[0]
    assert API_TOKEN_ENV in lines[0] and "--host 127.0.0.1" in lines[0]


@pytest.mark.parametrize("flag, what", [("--vllm-host", "vLLM"),
                                        ("--sync-host", "the weight-sync group")])
def test_trainer_refuses_a_non_loopback_host_without_a_secret(flag: str, what: str) -> None:
    done = run_module("example_trainer", flag, "0.0.0.0")
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"refusing to serve {what} on 0.0.0.0" in error[0]
    assert API_TOKEN_ENV in error[0] and f"{flag} 127.0.0.1" in error[0]


def test_vllm_server_refuses_a_non_loopback_host_without_a_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from example_trainer.vllm.server import VLLMServer
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="refusing to serve vLLM on 0.0.0.0"):
        VLLMServer("model", host="0.0.0.0")
    # With a key: vLLM's own key in its environment, never on its command line (ps, the log),
    # and our middleware for the routes vLLM's key leaves open.
    monkeypatch.setenv("VLLM_API_KEY", "stray")
    server = VLLMServer("model", host="0.0.0.0", api_key=TOKEN)
    assert TOKEN not in " ".join(server.command())
    assert "example_trainer.vllm.auth.RequireApiKey" in server.command()
    assert server.environment()["VLLM_API_KEY"] == TOKEN
    assert server.url.startswith("http://127.0.0.1:")
    assert "VLLM_API_KEY" not in VLLMServer("model").environment()  # no stray key


def test_loopback_and_token_helpers() -> None:
    for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "192.168.0.1", "no-such-host.invalid"):
        assert not is_loopback(host), host
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not bearer_matches(header, TOKEN), header


@pytest.mark.slow
def test_vllm_with_a_key_guards_every_route_but_health(tiny_model_dir, tmp_path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own --api-key leaves /collective_rpc and the other dev routes open; with our
    middleware they answer 401 too, and our client (which sends the key) works."""
    from example_trainer.vllm import VLLMServer
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    server = VLLMServer(tiny_model_dir, port=free_port(), api_key=TOKEN, enforce_eager=True,
                        dev_mode=True, max_model_len=128, kv_cache_memory_bytes="64M",
                        cpu_cores="0", log_path=tmp_path / "vllm.log", startup_timeout=600)
    with server:
        base = server.url
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/is_paused", None),
                                   ("POST", "/collective_rpc", {"method": "report_device_id"}),
                                   ("POST", "/pause", None), ("POST", "/reset_prefix_cache", None),
                                   ("GET", "/metrics", None)]:
            response = requests.request(method, base + path, json=body, timeout=30)
            assert response.status_code == 401, (path, response.status_code, response.text)
        client = server.client(timeout=60)
        assert client.models() == [str(tiny_model_dir)]
        assert client.is_paused() is False
        assert len(client.completions([1, 2, 3], max_tokens=2)[0].token_ids) == 2
