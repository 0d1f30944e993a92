"""Trajectory API: a drop-in replacement for Atropos' `run-api` (atroposlib 0.4.0 protocol).

Environments post scored groups of rollouts; the trainer polls /batch for exactly
`batch_size` sequences. The endpoints and JSON shapes are Atropos', so Atropos environments
and trainers work against it unchanged, but it fixes the reference server's measured faults:

- every post is validated (lengths, mask values, finite numbers, token limits) and a bad one
  is answered 422 naming the field and index, with nothing already queued lost or changed;
- batches are served oldest first and hold exactly `batch_size` sequences; groups whose sizes
  cannot pack exactly are split (with the whole group's score mean/std attached), so no group
  waits forever;
- the queue is bounded (`--max-queue-sequences`) and a full queue answers 429 + Retry-After;
- /reset_data really resets (a later /register takes effect, /batch answers null, not 500);
- the end of training is an explicit signal (POST /training_finished), not a sample count;
- the trainer publishes the weight version vLLM serves (POST /weight_version, shown in
  /status), which environments copy into each group they post as `weight_version`;
- the queue can live in a SQLite file (`--queue-db`): a restarted server keeps every queued
  group, registration, the step, weight version and finished state, and posts are atomic;
- a trainer that opts in (`"leases": true` at /register) gets leased batches it acknowledges
  and commits with its next poll, so a crashed and resumed trainer trains every group once;
  Atropos trainers keep delivery-is-acknowledgement;
- request bodies are capped (`--max-request-mb`, 413 before anything is parsed), gzip bodies
  (`Content-Encoding: gzip`) are accepted and capped after decompression, other encodings
  get 415 and a broken gzip stream 400;
- with a shared secret (`--api-token` or EXAMPLE_TRAINER_API_TOKEN) every request must carry
  it as a bearer token (401 otherwise), and without one it listens on loopback only.

Modules: `schema` (request models, `check_group`), `queue` (`TrajectoryQueue`: registrations,
back-pressure, run state; no HTTP), `packing` (exact-size oldest-first batch plans), `leases`
(the lease state machine), `store` (the SQLite tables and transactions), `app` (`create_app`:
FastAPI routes, body limit), `__main__` (the command line), `bench` (in-memory vs durable
queue throughput and memory).

Run: python -m environments.api_server --host 127.0.0.1 --port 8000
"""

from .app import DEFAULT_MAX_REQUEST_MB, BearerAuth, RequestBodyLimit, create_app
from .queue import (QueueFull, QueueInUse, TrainingFinished, TrajectoryQueue, UnknownEnv,
                    exact_subset, split_group)
from .schema import GroupError, ScoredData, check_group

__all__ = ["DEFAULT_MAX_REQUEST_MB", "BearerAuth", "GroupError", "QueueFull", "QueueInUse",
           "RequestBodyLimit", "ScoredData", "TrainingFinished", "TrajectoryQueue",
           "UnknownEnv", "check_group", "create_app", "exact_subset", "split_group"]
