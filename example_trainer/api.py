"""Trajectory-API client (Atropos run-api protocol) and the batch fetcher all modes share.

The fetcher owns everything between "the API has data" and "a padded Batch": registering the
trainer, polling /batch with exponential backoff, riding out short API outages, and turning
groups into tensors. Malformed groups are counted in `rejected_groups`, never silently lost.

With `leases=True` (the trainer's choice; this project's API supports it, Atropos' does
not and the fetcher then works as without) every batch the API hands out stays leased there
until a checkpoint covers it. Each poll acknowledges the batches handed out before it (their
steps are done) and, after a checkpoint, commits the leases it covers, in the poll's query
string: no extra round trip. The checkpoint records the last lease it covers
(`lease_record`); a resumed fetcher claims it at /register, and the API returns every lease
past it (a SIGKILLed trainer's untrained and trained-but-unsaved batches) to the head of its
queue, in order.

The fetcher also remembers the raw groups of the batch it handed out last (`in_flight`) until
that step is trained: an interruption in between saves them with the final checkpoint (whose
lease record then covers them), and a resumed run trains them first (`replay`). That keeps
resume working against an API that was restarted without a durable queue.

An API server that restarts has the trainer re-register: the fetcher notices a new
`instance_id` in /status while it waits and registers again at the step after the last batch
it handed out, claiming the leases it holds. A durable API (--queue-db) kept them and the
queue; an in-memory one forgot both, so nothing it handed out is trained twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

import requests

from environments.transport import API_TOKEN_ENV, bearer_headers
from environments.transport import api_token as shared_secret

from .batch import Batch, collate_groups
from .checkpoint import SAFE_POINTS, rng_state

log = logging.getLogger(__name__)


class ApiUnavailable(RuntimeError):
    """The trajectory API did not answer in time; the message says how to start it."""


class ApiUnauthorized(ApiUnavailable):
    """The API answered 401 (it has a shared secret; we sent none or another): retrying
    cannot help, so the run ends with this one line instead of waiting out a timeout."""


class TrajectoryClient:
    """Thin typed wrapper over the trajectory API's HTTP endpoints.

    `api_token`: the shared secret sent as a bearer token with every request; by default
    $EXAMPLE_TRAINER_API_TOKEN (none set: nothing sent, as Atropos' trainers do)."""

    def __init__(self, url: str, *, request_timeout: float = 30.0,
                 api_token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.request_timeout = request_timeout
        self.session = requests.Session()
        self.session.headers.update(bearer_headers(shared_secret(api_token)))

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(method, self.url + path,
                                        timeout=self.request_timeout, **kwargs)
        _refuse_unauthorized(response, self.url)
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
                 wandb_group: str = "", leases: bool = False,
                 lease_claim: dict[str, str | None] | None = None) -> dict[str, Any]:
        """The answer: {"uuid"}, and from this project's API "queue_id" and "leases"."""
        body = {"batch_size": batch_size, "max_token_len": max_token_len,
                "num_steps": num_steps, "starting_step": starting_step,
                "checkpoint_dir": checkpoint_dir,
                "save_checkpoint_interval": save_checkpoint_interval,
                "wandb_project": wandb_project, "wandb_group": wandb_group}
        if leases:
            body.update(leases=True, lease_claim=lease_claim or {})
        return self._call("POST", "/register", json=body)

    def get_batch(self, ack: str | None = None, commit: str | None = None
                  ) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(groups or None, lease id or None); `ack`/`commit` ride along in the query."""
        params = {key: value for key, value in (("ack", ack), ("commit", commit)) if value}
        answer = self._call("GET", "/batch", params=params or None)
        return answer["batch"], answer.get("lease_id")

    def acknowledge(self, ack: str | None, commit: str | None) -> None:
        self._call("POST", "/batch/ack", json={"ack": ack, "commit": commit})

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    _missing_endpoints: frozenset[str] = frozenset()  # 404s seen for the two posts below

    def publish_weight_version(self, version: int) -> None:
        self._post_if_supported("/weight_version", {"version": version})

    def finish(self, reason: str = "completed") -> None:
        """Tell environments training is over, so they stop on a signal, not a count."""
        self._post_if_supported("/training_finished", {"reason": reason})

    def _post_if_supported(self, path: str, body: dict[str, Any]) -> None:
        """POST to an endpoint of this project's API that Atropos' run-api lacks (404): warned
        about once, then not sent again (run-api environments stop on its step count)."""
        if path in self._missing_endpoints:
            return
        response = self.session.post(self.url + path, json=body, timeout=self.request_timeout)
        _refuse_unauthorized(response, self.url)
        if response.status_code == 404:
            self._missing_endpoints = self._missing_endpoints | {path}
            log.warning("trajectory API %s has no POST %s (Atropos run-api?): not sent again",
                        self.url, path)
            return
        response.raise_for_status()


def _refuse_unauthorized(response: requests.Response, url: str) -> None:
    if response.status_code == 401:
        raise ApiUnauthorized(
            f"trajectory API at {url} refused {response.request.method} "
            f"{urlparse(response.url).path} (401: no or wrong bearer token): set "
            f"{API_TOKEN_ENV} to the secret the API server was started with")


def first_batch_progress(status: dict[str, Any] | None, batch_size: int,
                         waited_s: float) -> str:
    """The line the trainer prints while it waits for its first batch: what the API holds
    against what the batch needs, from a /status answer (None: it did not answer).

    The batch is `batch_size` sequences, and that is what the API serves exactly, so the
    need is counted in sequences: the trainer does not know the environments' group sizes
    (groups may even be split to fit). This project's API reports sequences and groups
    (`queued_sequences`, `queued_groups`); Atropos' run-api only `queue_size`, in groups."""
    waited = f"({waited_s:.0f} s so far)"
    if not isinstance(status, dict):
        return f"waiting for the first batch: the API does not answer /status {waited}"
    sequences, groups = status.get("queued_sequences"), status.get("queued_groups")
    if isinstance(sequences, int) and isinstance(groups, int):
        return (f"waiting for the first batch: the API queue holds {groups} "
                f"group{'' if groups == 1 else 's'}, {sequences} of the {batch_size} "
                f"sequences it needs {waited}")
    groups = status.get("queue_size")
    if isinstance(groups, int):
        return (f"waiting for the first batch: the API queue holds {groups} "
                f"group{'' if groups == 1 else 's'}; it needs {batch_size} sequences {waited}")
    return f"waiting for the first batch of {batch_size} sequences {waited}"


@dataclass
class FetchStats:
    wait_s: float = 0.0
    polls: int = 0
    rejected_groups: int = 0
    weight_versions: list[int] = field(default_factory=list)  # as tagged by environments
    served_version: int | None = None  # what vLLM served when the batch was taken


def weight_versions(groups: list[dict[str, Any]]) -> list[int]:
    """The `weight_version` tags of the groups that have one (environments add it)."""
    return [g["weight_version"] for g in groups
            if isinstance(g.get("weight_version"), int) and not isinstance(
                g.get("weight_version"), bool)]


class BatchFetcher:
    """Registers the trainer and hands out one padded Batch per training step."""

    def __init__(self, client: TrajectoryClient, *, batch_size: int, max_token_len: int,
                 num_steps: int, pad_id: int, vocab_size: int | None = None,
                 std_norm: bool = True, batch_timeout: float = 600.0,
                 starting_step: int = 0, checkpoint_dir: str = "",
                 wandb_project: str = "", wandb_group: str = "", leases: bool = False,
                 resume_lease: str | None = None) -> None:
        """`leases`: lease batches (see the module docstring); `resume_lease`: the lease
        record of the checkpoint this run resumes from (what it covers)."""
        self.client = client
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.max_token_len = max_token_len
        self.std_norm = std_norm
        self.batch_timeout = batch_timeout
        self.rejected_reasons: list[str] = []
        self.last = FetchStats()
        self.starting_step = starting_step
        self.replay: list[list[dict[str, Any]]] = []  # untrained batches of an earlier run
        self.handed_out = 0
        self.in_flight: list[dict[str, Any]] | None = None  # raw groups of the last batch
        self.in_flight_rng: dict[str, Any] | None = None   # RNG when it was handed out
        self.weight_version: int | None = None
        # Checks run while waiting (e.g. vLLM's health): data waits on vLLM indirectly, so a
        # dead server must fail the wait clearly instead of running out the batch timeout.
        self.watchdogs: list[Callable[[], None]] = []
        # While the first batch is awaited, say what the API holds this often (a first
        # batch can take minutes: vLLM starting, environments sampling on a CPU).
        self.progress_every_s = 10.0
        self._registration = dict(batch_size=batch_size, max_token_len=max_token_len,
                                  num_steps=num_steps, starting_step=starting_step,
                                  checkpoint_dir=checkpoint_dir, wandb_project=wandb_project,
                                  wandb_group=wandb_group)
        self.leases = leases
        self.last_lease: str | None = None     # the last lease the API handed out
        self.commit_due: str | None = None     # covered by a checkpoint, not yet sent
        self.committed: str | None = resume_lease  # sent (or claimed at registration)
        self.queue_id: str | None = None
        self.uuid = self._register(starting_step, keep=None)
        self.instance = self._server_instance()
        self.reregistrations = 0  # after API restarts
        self._instance_checked = time.monotonic()
        log.info("registered with trajectory API %s (batch_size=%d)", client.url, batch_size)

    def add_watchdog(self, check: Callable[[], None]) -> None:
        """Run `check()` on every poll while waiting for data; it raises to end the wait."""
        self.watchdogs.append(check)

    def _status_or_none(self) -> dict[str, Any] | None:
        """/status, or None when the API does not answer it (the progress line says so)."""
        try:
            answer = self.client.status()
        except (requests.RequestException, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def _server_instance(self) -> str | None:
        """The API's instance id (None: unreachable, or a server that has none)."""
        try:
            instance = self.client.status().get("instance_id")
        except (requests.RequestException, ValueError, AttributeError):
            return None
        return instance if isinstance(instance, str) else None

    def reregister_if_restarted(self, *, force: bool = False, every_s: float = 2.0) -> bool:
        """Register again if the API restarted (or was reset) since we registered.

        It restarts at the last step handed out, so its step count continues and the
        environments see a trainer again; rate-limited, as it runs while polling."""
        now = time.monotonic()
        if not force and now - self._instance_checked < every_s:
            return False
        self._instance_checked = now
        instance = self._server_instance()
        if instance is None or instance == self.instance:
            return False
        step = self.in_flight_step
        try:
            self.uuid = self._register(step, keep=self.last_lease)
        except requests.RequestException as err:
            log.warning("trajectory API restarted, registering again failed (%s); retrying",
                        type(err).__name__)
            return False
        log.warning("trajectory API %s restarted (instance %s -> %s): registered again at "
                    "step %d", self.client.url, self.instance, instance, step)
        self.instance = instance
        self.reregistrations += 1
        if self.weight_version is not None:  # the new server knows no version either
            self.publish_weight_version(self.weight_version)
        return True

    def _register(self, step: int, keep: str | None) -> str:
        """Register at `step`, claiming the leases this trainer holds (`keep`: up to the last
        one handed out) or a checkpoint covers (`commit`)."""
        commit = self.commit_due or self.committed
        answer = self.client.register(**{**self._registration, "starting_step": step},
                                      leases=self.leases,
                                      lease_claim={"keep": keep, "commit": commit})
        queue_id = answer.get("queue_id") if answer.get("leases") else None
        if self.leases and queue_id is None:
            log.info("the trajectory API at %s does not lease batches (an Atropos run-api?): "
                     "a batch counts as delivered once served", self.client.url)
        elif queue_id != self.queue_id and self.queue_id is not None:
            log.warning("the trajectory API's queue changed (%s -> %s: restarted without "
                        "--queue-db, or reset): the leases of the old one are gone",
                        self.queue_id, queue_id)
        if queue_id != self.queue_id:
            self.last_lease = self.commit_due = None
        self.queue_id = queue_id
        return answer["uuid"]

    def lease_record(self) -> str | None:
        """For a checkpoint: the last lease it covers. Called when every batch handed out is
        trained or saved as pending, which is whenever a checkpoint is written."""
        return self.last_lease

    def checkpoint_saved(self, lease: str | None) -> None:
        """A checkpoint covering `lease` is on disk: commit it with the next poll."""
        if lease is not None and self.queue_id is not None and lease.startswith(
                f"{self.queue_id}-"):
            self.commit_due = lease

    def flush_acknowledgements(self) -> None:
        """Send a due commit now (the last words of a run: no poll follows); best effort."""
        if self.commit_due is None:
            return
        try:
            self.client.acknowledge(self.last_lease, self.commit_due)
        except requests.RequestException as err:
            log.warning("could not commit lease %s to the API (%s); a resume claims it "
                        "from the checkpoint", self.commit_due, type(err).__name__)
            return
        self.committed, self.commit_due = self.commit_due, None

    @property
    def rejected_groups(self) -> int:
        return len(self.rejected_reasons)

    @property
    def in_flight_step(self) -> int:
        """The 1-based step the last handed-out batch is for."""
        return self.starting_step + self.handed_out

    def untrained(self, completed_step: int) -> list[list[dict[str, Any]]]:
        """Batches taken from the API (or replayed) that no finished step has trained."""
        pending = list(self.replay)
        if self.in_flight is not None and self.in_flight_step > completed_step:
            pending.insert(0, self.in_flight)
        return pending

    def _take(self) -> list[dict[str, Any]] | None:
        if self.replay:
            log.info("training a batch an interrupted run took from the API but never "
                     "trained (%d left)", len(self.replay) - 1)
            return self.replay.pop(0)
        # Polled only once the previous step is done: acknowledge everything handed out.
        groups, lease = self.client.get_batch(ack=self.last_lease if self.leases else None,
                                              commit=self.commit_due)
        if self.commit_due is not None:
            self.committed, self.commit_due = self.commit_due, None
        if lease is not None:
            self.last_lease = lease
        return groups

    def next_batch(self) -> Batch:
        """Poll /batch with backoff until a usable batch arrives or batch_timeout passes."""
        start = time.monotonic()
        delay, polls, rejected_before = 0.05, 0, self.rejected_groups
        api_failed = False
        first = self.handed_out == 0
        next_progress = start + self.progress_every_s
        while True:
            polls += 1
            recovered, api_failed = api_failed, False  # the API answered after failing
            for check in self.watchdogs:
                check()
            # From the API popping a batch until the fetcher has recorded it, SIGINT/SIGTERM
            # wait (checkpoint.SAFE_POINTS): a batch in transit would be lost to both sides.
            with SAFE_POINTS.critical():
                try:
                    groups = self._take()
                except requests.RequestException as err:
                    log.warning("trajectory API unreachable (%s); retrying",
                                type(err).__name__)
                    groups, api_failed = None, True
                batch = None
                if groups:
                    batch = collate_groups(groups, pad_id=self.pad_id, std_norm=self.std_norm,
                                           vocab_size=self.vocab_size,
                                           max_token_len=self.max_token_len,
                                           rejected=self.rejected_reasons)
                if batch is not None:
                    self.in_flight, self.in_flight_rng = groups, rng_state()
                    self.handed_out += 1
                    self.last = FetchStats(time.monotonic() - start, polls,
                                           self.rejected_groups - rejected_before,
                                           weight_versions(groups), self.weight_version)
            if batch is not None:
                return batch
            if not api_failed and self.reregister_if_restarted(force=recovered):
                delay = 0.05  # poll the new server at once
                continue
            waited = time.monotonic() - start
            if waited > self.batch_timeout:
                raise TimeoutError(
                    f"no batch from {self.client.url} within {self.batch_timeout:.0f} s: is an "
                    "environment running and posting scored data? (--batch-timeout)")
            if first and time.monotonic() >= next_progress:
                log.info("%s", first_batch_progress(self._status_or_none(),
                                                    self._registration["batch_size"], waited))
                next_progress = time.monotonic() + self.progress_every_s
            elif not first and (polls in (20, 200) or polls % 1000 == 0):
                log.info("waiting for data from %s (%.0f s so far)", self.client.url, waited)
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def publish_weight_version(self, version: int) -> None:
        """Announce the weights vLLM serves from now on; best effort, like `finish`."""
        self.weight_version = version
        try:
            self.client.publish_weight_version(version)
        except (requests.RequestException, ApiUnauthorized) as err:
            log.warning("could not publish weight version %d: %s", version, err)

    def metrics(self) -> dict[str, float]:
        """The last fetch, for the step's log line: wait, and how stale the rollouts were
        (the version served when the batch was taken minus the version each group was
        sampled under, in steps; 0 = on-policy)."""
        last = self.last
        out = {"data/wait_s": last.wait_s, "data/rejected_groups": float(last.rejected_groups)}
        if self.reregistrations:
            out["data/api_reregistrations"] = float(self.reregistrations)
        if last.weight_versions and last.served_version is not None:
            out["data/staleness_max"] = float(last.served_version - min(last.weight_versions))
            out["data/staleness_mean"] = float(last.served_version - sum(
                last.weight_versions) / len(last.weight_versions))
        return out

    def finish(self, reason: str = "completed") -> None:
        self.flush_acknowledgements()
        try:
            self.client.finish(reason)
        except (requests.RequestException, ApiUnauthorized) as err:
            log.warning("could not tell the API that training finished: %s", err)
