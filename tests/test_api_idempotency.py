"""A post's Idempotency-Key: a retry after a lost answer is stored once, against real servers.

The lost answer is real too: `LosesOneAnswer` is a TCP proxy in front of the API server that
forwards everything except the answer to one POST (the server has stored the group; the
client sees its connection close and retries). Without a key that retry queues the group twice
(the control at the end of the client test); with the environments' key it does not.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from conftest import free_port, start_api_server, stop_process_group
from test_api_server import get, make_group, post, start_with_env
from test_environment import FakeTokenizer, fake_group

HEADER = "Idempotency-Key"


def post_keyed(url: str, path: str, body: object, key: str | None) -> requests.Response:
    headers = {HEADER: key} if key is not None else {}
    return requests.post(url + path, json=body, headers=headers, timeout=5)


def queued_groups(url: str) -> int:
    return get(url, "/status")["queued_groups"]


def test_a_key_is_stored_once_across_endpoints_restarts_and_refusals(tmp_path: Path) -> None:
    db, port = tmp_path / "queue.db", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-1.log")
    try:
        env_id = start_with_env(url, 2)
        first = post_keyed(url, "/scored_data", make_group(0, 2, env_id=env_id), "k1")
        assert first.json() == {"status": "received"}
        again = post_keyed(url, "/scored_data", make_group(0, 2, env_id=env_id), "k1")
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert queued_groups(url) == 1

        pair = [make_group(t, 2, env_id=env_id) for t in (1, 2)]
        answer = post_keyed(url, "/scored_data_list", pair, "k2").json()
        assert "duplicate" not in answer and answer["groups_processed"] == 2
        answer = post_keyed(url, "/scored_data_list", pair, "k2").json()
        assert answer["duplicate"] is True and answer["groups_processed"] == 0
        # a key names a post and its groups, whichever endpoint it went to
        assert post_keyed(url, "/scored_data_list", [make_group(0, 2, env_id=env_id)],
                          "k1").json()["duplicate"] is True
        reused = post_keyed(url, "/scored_data_list", pair, "k1")  # other groups, same key
        assert reused.status_code == 422 and "'k1' was sent before with other groups" in \
            reused.text
        assert queued_groups(url) == 3

        # a refused post does not use up its key: the corrected retry is stored
        bad = make_group(3, 2, env_id=env_id) | {"scores": [1.0]}
        assert post_keyed(url, "/scored_data", bad, "k3").status_code == 422
        assert "duplicate" not in post_keyed(url, "/scored_data",
                                             make_group(3, 2, env_id=env_id), "k3").json()
        assert queued_groups(url) == 4

        # an empty key is refused, naming the header
        empty = post_keyed(url, "/scored_data", make_group(4, 2, env_id=env_id), "")
        assert empty.status_code == 422 and HEADER.lower() in empty.text.lower()

        os.killpg(server.pid, signal.SIGKILL)  # the keys are stored with their groups
        server.wait(timeout=30)
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-2.log")
        assert post_keyed(url, "/scored_data", make_group(0, 2, env_id=env_id),
                          "k1").json()["duplicate"] is True
        assert queued_groups(url) == 4

        # no key (Atropos' clients): every post is stored, as before
        for _ in range(2):
            assert post_keyed(url, "/scored_data", make_group(5, 2, env_id=env_id),
                              None).json() == {"status": "received"}
        assert queued_groups(url) == 6

        get(url, "/reset_data")  # forgets the keys with the queue
        env_id = start_with_env(url, 2)
        assert "duplicate" not in post_keyed(url, "/scored_data",
                                             make_group(0, 2, env_id=env_id), "k1").json()
        assert queued_groups(url) == 1
    finally:
        stop_process_group(server)


def test_keys_are_forgotten_after_their_time(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are kept POST_KEY_TTL_S (an hour), pruned as later keyed posts are stored."""
    from environments.api_server import queue as queue_module
    from environments.api_server.schema import ScoredData, TrainerRegistration
    queue = queue_module.TrajectoryQueue(64, str(tmp_path / "queue.db"))
    queue.register_trainer(TrainerRegistration(batch_size=2, max_token_len=64, num_steps=10))
    group = ScoredData(**make_group(0, 2))
    assert queue.post_groups([group], as_list=False, key="old") is True
    assert queue.post_groups([group], as_list=False, key="old") is False
    monkeypatch.setattr(queue_module, "POST_KEY_TTL_S", -1.0)  # everything stored is old
    assert queue.post_groups([group], as_list=False, key="new") is True
    assert queue.post_groups([group], as_list=False, key="old") is True
    assert len(queue.queue) == 3


class LosesOneAnswer:
    """A TCP proxy to `port` that, once armed, closes the client's connection instead of
    passing on the answer to the next request starting with `request_line`."""

    def __init__(self, port: int, request_line: bytes) -> None:
        self.port, self.request_line = port, request_line
        self.armed = True
        self.lost: list[bytes] = []  # the status line of each answer kept from the client
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.sockets += [client, upstream]
            lose = threading.Event()
            threading.Thread(target=self._forward_requests, args=(client, upstream, lose),
                             daemon=True).start()
            threading.Thread(target=self._forward_answers, args=(upstream, client, lose),
                             daemon=True).start()

    def _forward_requests(self, client: socket.socket, upstream: socket.socket,
                          lose: threading.Event) -> None:
        try:
            while chunk := client.recv(65536):
                if self.armed and chunk.startswith(self.request_line):
                    self.armed = False
                    lose.set()
                upstream.sendall(chunk)
        except OSError:
            pass

    def _forward_answers(self, upstream: socket.socket, client: socket.socket,
                         lose: threading.Event) -> None:
        try:
            while chunk := upstream.recv(65536):
                if lose.is_set():  # the server has answered (and stored the post, if 200)
                    self.lost.append(chunk.split(b"\r\n", 1)[0])
                    break
                client.sendall(chunk)
        except OSError:
            pass
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_environment_retry_after_a_lost_answer_queues_the_group_once(tmp_path: Path) -> None:
    from environments.arithmetic import ArithmeticEnv
    from environments.base import EnvConfig
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server: subprocess.Popen = start_api_server(port, log_path=tmp_path / "api.log")
    proxy = LosesOneAnswer(port, b"POST /scored_data ")
    try:
        start_with_env(url, 2)  # the trainer, straight to the server
        env = ArithmeticEnv(EnvConfig(api_url=proxy.url, group_size=2, api_timeout=60,
                                      poll_interval=0.05), tokenizer=FakeTokenizer())
        assert env.register()
        group = fake_group(env)
        assert env.post_group(group) is True
        # the first answer (the post was stored) never arrived; the client posted again
        assert proxy.lost == [b"HTTP/1.1 200 OK"]
        assert queued_groups(url) == 1

        # Control: the same lost answer without a key queues the group twice.
        proxy.armed = True
        with pytest.raises(requests.ConnectionError):
            requests.post(proxy.url + "/scored_data", json=group, timeout=5)
        assert proxy.lost == [b"HTTP/1.1 200 OK"] * 2
        post(url, "/scored_data", group)
        assert queued_groups(url) == 3
    finally:
        proxy.close()
        stop_process_group(server)
