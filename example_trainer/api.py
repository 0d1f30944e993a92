"""Trajectory-API client (Atropos run-api protocol) and the batch fetcher all modes share.

The fetcher owns everything between "the API has data" and "a padded Batch": registering the
trainer, polling /batch with exponential backoff, riding out short API outages, and turning
groups into tensors. Malformed groups are counted in `rejected_groups`, never silently lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import requests

from .batch import Batch, collate_groups

log = logging.getLogger(__name__)


class ApiUnavailable(RuntimeError):
    """The trajectory API did not answer in time; the message says how to start it."""


class TrajectoryClient:
    """Thin typed wrapper over the trajectory API's HTTP endpoints."""

    def __init__(self, url: str, *, request_timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.request_timeout = request_timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(method, self.url + path,
                                        timeout=self.request_timeout, **kwargs)
        response.raise_for_status()
        return response.json()

    def wait_until_up(self, timeout: float) -> None:
        """Poll /status until it answers, or fail with a message naming the URL and the fix."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/status")
                return
            except requests.RequestException as err:
                if time.monotonic() > deadline:
                    port = urlparse(self.url).port or 8000
                    raise ApiUnavailable(
                        f"trajectory API at {self.url} did not answer within {timeout:.0f} s "
                        f"({type(err).__name__}). Start it with `python -m "
                        f"environments.api_server --host 127.0.0.1 --port {port}` or pass "
                        "--api-url") from None
                time.sleep(0.5)

    def register(self, *, batch_size: int, max_token_len: int, num_steps: int,
                 starting_step: int = 0, checkpoint_dir: str = "",
                 save_checkpoint_interval: int = 0, wandb_project: str = "",
                 wandb_group: str = "") -> str:
        body = {"batch_size": batch_size, "max_token_len": max_token_len,
                "num_steps": num_steps, "starting_step": starting_step,
                "checkpoint_dir": checkpoint_dir,
                "save_checkpoint_interval": save_checkpoint_interval,
                "wandb_project": wandb_project, "wandb_group": wandb_group}
        return self._call("POST", "/register", json=body)["uuid"]

    def get_batch(self) -> list[dict[str, Any]] | None:
        return self._call("GET", "/batch")["batch"]

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def finish(self, reason: str = "completed") -> None:
        """Tell environments training is over, so they stop on a signal, not a count."""
        self._call("POST", "/training_finished", json={"reason": reason})


@dataclass
class FetchStats:
    wait_s: float = 0.0
    polls: int = 0
    rejected_groups: int = 0


class BatchFetcher:
    """Registers the trainer and hands out one padded Batch per training step."""

    def __init__(self, client: TrajectoryClient, *, batch_size: int, max_token_len: int,
                 num_steps: int, pad_id: int, vocab_size: int | None = None,
                 std_norm: bool = True, batch_timeout: float = 600.0,
                 starting_step: int = 0, checkpoint_dir: str = "",
                 wandb_project: str = "", wandb_group: str = "") -> None:
        self.client = client
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.max_token_len = max_token_len
        self.std_norm = std_norm
        self.batch_timeout = batch_timeout
        self.rejected_reasons: list[str] = []
        self.last = FetchStats()
        self._registration = dict(batch_size=batch_size, max_token_len=max_token_len,
                                  num_steps=num_steps, starting_step=starting_step,
                                  checkpoint_dir=checkpoint_dir, wandb_project=wandb_project,
                                  wandb_group=wandb_group)
        self.uuid = client.register(**self._registration)
        log.info("registered with trajectory API %s (batch_size=%d)", client.url, batch_size)

    @property
    def rejected_groups(self) -> int:
        return len(self.rejected_reasons)

    def next_batch(self) -> Batch:
        """Poll /batch with backoff until a usable batch arrives or batch_timeout passes."""
        start = time.monotonic()
        delay, polls, rejected_before = 0.05, 0, self.rejected_groups
        while True:
            polls += 1
            try:
                groups = self.client.get_batch()
            except requests.RequestException as err:
                log.warning("trajectory API unreachable (%s); retrying", type(err).__name__)
                groups = None
            if groups:
                batch = collate_groups(groups, pad_id=self.pad_id, std_norm=self.std_norm,
                                       vocab_size=self.vocab_size,
                                       max_token_len=self.max_token_len,
                                       rejected=self.rejected_reasons)
                if batch is not None:
                    self.last = FetchStats(time.monotonic() - start, polls,
                                           self.rejected_groups - rejected_before)
                    return batch
            waited = time.monotonic() - start
            if waited > self.batch_timeout:
                raise TimeoutError(
                    f"no batch from {self.client.url} within {self.batch_timeout:.0f} s: is an "
                    "environment running and posting scored data? (--batch-timeout)")
            if polls in (20, 200) or polls % 1000 == 0:
                log.info("waiting for data from %s (%.0f s so far)", self.client.url, waited)
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def finish(self, reason: str = "completed") -> None:
        try:
            self.client.finish(reason)
        except requests.RequestException as err:
            log.warning("could not tell the API that training finished: %s", err)
