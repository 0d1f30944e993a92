"""HTTP client for a running vLLM server (ours or one the user started).

Works in token ids end to end: prompts go in as ids and sampled ids come back with their
log-probs, so the trainer never re-tokenises text and the inference log-probs line up with
the trainer's token for token. Routes and fields are those of vLLM 0.32 (read from
`vllm/entrypoints/` and checked against a live server):

- `POST /v1/completions` with `prompt: [ids] | [[ids], ...]`, `logprobs: 0`,
  `return_tokens_as_token_ids: true`, `return_token_ids: true`. Each choice carries
  `token_ids`, `logprobs.tokens` as `"token_id:123"` strings and `logprobs.token_logprobs`
  (clamped to >= -9999). Choices are ordered prompt-major: index = prompt * n + sample.
  An aborted request still answers 200, with `finish_reason: "abort"` on its choices.
- `prompt_logprobs: 0` adds `choices[0].prompt_logprobs`: `[null, {"<id>": {"logprob",
  "rank", "decoded_token"}}, ...]`, one entry per prompt token (the first has no prefix).
- Dev mode (`VLLM_SERVER_DEV_MODE=1`): `POST /pause?mode=abort|wait|keep&clear_cache=bool`
  (server default clear_cache=true; ignored for keep), `POST /resume`, `GET /is_paused` ->
  `{"is_paused": bool}`, `POST /reset_prefix_cache?reset_running_requests=bool` ->
  `{"success": bool}`, `POST /collective_rpc {"method", "args", "kwargs", "timeout"}` ->
  `{"results": [one per worker]}` (non-JSON results come back as `str()`).
- `POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"}` and
  `POST /v1/unload_lora_adapter {"lora_name"}` (need VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).

vLLM 0.32 queues new requests during a pause; 0.33 answers 503 for abort/wait pauses. Both
surface here as `GenerationAborted`, which callers retry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import requests

from environments.transport import api_token, bearer_headers

log = logging.getLogger(__name__)

_TOKEN_PREFIX = "token_id:"
_RETRYABLE_STATUS = {503}


class VLLMError(RuntimeError):
    """The server answered with a non-2xx status; carries the status and response text."""

    def __init__(self, message: str, status_code: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.text = text


class GenerationAborted(VLLMError):
    """The request was aborted (a pause, an abort) or refused for now: retry it later."""

    def __init__(self, message: str, status_code: int | None = None, text: str = "",
                 partial: list["Completion"] | None = None) -> None:
        super().__init__(message, status_code, text)
        self.partial = partial or []


@dataclass
class Completion:
    """One sampled continuation: its token ids and the log-prob vLLM gave each of them."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str
    prompt_index: int = 0


def _parse_token(token: str) -> int:
    if not token.startswith(_TOKEN_PREFIX):
        raise VLLMError(f"expected a '{_TOKEN_PREFIX}N' token (return_tokens_as_token_ids), got {token!r}")
    return int(token[len(_TOKEN_PREFIX):])


class VLLMClient:
    """A thin, typed wrapper over the vLLM routes the trainers use."""

    def __init__(self, url: str, timeout: float = 600.0, session: requests.Session | None = None,
                 pause_timeout: float | None = None, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # how long `paused("wait")` may wait for running requests (the run's --sync-timeout)
        self.pause_timeout = timeout if pause_timeout is None else pause_timeout
        self.session = session or requests.Session()
        # vLLM's API key: by default the run's shared secret (EXAMPLE_TRAINER_API_TOKEN).
        self.session.headers.update(bearer_headers(api_token(api_key)))

    def __repr__(self) -> str:
        return f"VLLMClient({self.url!r})"

    # ---------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        try:
            resp = self.session.request(method, f"{self.url}{path}",
                                        timeout=self.timeout if timeout is None else timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise VLLMError(f"cannot reach vLLM at {self.url}: {exc}") from exc
        except requests.Timeout as exc:
            raise VLLMError(f"vLLM at {self.url} did not answer {method} {path} within "
                            f"{self.timeout if timeout is None else timeout} s") from exc
        if resp.status_code in _RETRYABLE_STATUS:
            raise GenerationAborted(f"{method} {path} -> {resp.status_code} (retry later): {resp.text[:500]}",
                                    resp.status_code, resp.text)
        if not 200 <= resp.status_code < 300:
            raise VLLMError(f"{method} {path} -> {resp.status_code}: {resp.text[:2000]}",
                            resp.status_code, resp.text)
        return resp

    @staticmethod
    def _json(resp: requests.Response) -> Any:
        if not resp.content:
            return None
        try:
            return resp.json()
        except json.JSONDecodeError:
            return resp.text

    # ---------------------------------------------------------------- health

    def health(self) -> bool:
        """True when GET /health answers 200."""
        try:
            return self.session.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 600.0, interval: float = 0.5) -> float:
        """Block until the server is healthy; returns the seconds waited."""
        t0 = time.monotonic()
        while not self.health():
            if time.monotonic() - t0 > timeout:
                raise VLLMError(f"vLLM at {self.url} not healthy after {timeout:.0f} s")
            time.sleep(interval)
        return time.monotonic() - t0

    def models(self) -> list[str]:
        """Served model names (the base model first, then loaded LoRA adapters)."""
        data = self._request("GET", "/v1/models", timeout=30).json()
        return [m["id"] for m in data.get("data", [])]

    # ---------------------------------------------------------------- generation

    def completions(
        self,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        model: str | None = None,
        logprobs: bool = True,
        stop_token_ids: Sequence[int] | None = None,
        **extra_body: Any,
    ) -> list[Completion]:
        """Sample `n` continuations per prompt; returns them prompt-major.

        Log-probs are vLLM's default `raw_logprobs` (before temperature): they equal the
        sampling distribution only at temperature 1, top_p 1; start the server with
        `logprobs_mode="processed_logprobs"` to get temperature-scaled ones.
        Raises `GenerationAborted` if any choice was aborted (e.g. by `/pause?mode=abort`).
        """
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        batched = not isinstance(prompt_token_ids[0], int)
        prompt = [list(map(int, p)) for p in prompt_token_ids] if batched else list(map(int, prompt_token_ids))
        body: dict[str, Any] = {
            "prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        if logprobs:
            body["logprobs"] = 0
        if seed is not None:
            body["seed"] = seed
        if model is not None:
            body["model"] = model
        if stop_token_ids:
            body["stop_token_ids"] = list(map(int, stop_token_ids))
        body.update(extra_body)
        data = self._request("POST", "/v1/completions", json=body).json()
        out = [self._parse_choice(c, n, logprobs) for c in sorted(data["choices"], key=lambda c: c["index"])]
        aborted = [c for c in out if c.finish_reason == "abort"]
        if aborted:
            raise GenerationAborted(f"{len(aborted)} of {len(out)} completions aborted by the server",
                                    partial=out)
        return out

    @staticmethod
    def _parse_choice(choice: dict[str, Any], n: int, want_logprobs: bool) -> Completion:
        lp = choice.get("logprobs") or {}
        ids_from_lp = [_parse_token(t) for t in lp.get("tokens", [])]
        ids = choice.get("token_ids")
        if ids is None:
            ids = ids_from_lp
        elif want_logprobs and ids_from_lp and ids_from_lp != ids:
            raise VLLMError(f"token_ids {ids} disagree with logprob tokens {ids_from_lp}")
        values = [float("nan") if v is None else float(v) for v in lp.get("token_logprobs", [])]
        if want_logprobs and len(values) != len(ids):
            raise VLLMError(f"{len(ids)} tokens but {len(values)} log-probs in {choice}")
        return Completion(token_ids=list(ids), logprobs=values, finish_reason=choice.get("finish_reason"),
                          text=choice.get("text", ""), prompt_index=int(choice["index"]) // max(n, 1))

    def prompt_logprobs(self, token_ids: Sequence[int], model: str | None = None) -> list[float]:
        """log p(token_i | tokens_<i) for i = 1..n-1, as vLLM's forward pass computes it.

        Prompt log-probs skip the prefix cache and the sampling processors, so this is a
        clean probe of the served weights (used by `parity.check_parity`).
        """
        ids = list(map(int, token_ids))
        if len(ids) < 2:
            raise ValueError("need at least two tokens to score")
        body: dict[str, Any] = {"prompt": ids, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
        if model is not None:
            body["model"] = model
        data = self._request("POST", "/v1/completions", json=body).json()
        choice = data["choices"][0]
        if choice.get("finish_reason") == "abort":
            raise GenerationAborted("prompt-logprob request aborted by the server")
        entries = choice.get("prompt_logprobs")
        if entries is None or len(entries) != len(ids):
            raise VLLMError(f"expected {len(ids)} prompt_logprobs entries, got {entries!r:.500}")
        out = []
        for pos in range(1, len(ids)):
            entry = entries[pos] or {}
            item = entry.get(str(ids[pos]))
            if item is None:
                raise VLLMError(f"prompt_logprobs at position {pos} lack token {ids[pos]}: {entry}")
            value = item["logprob"] if isinstance(item, dict) else item
            out.append(float(value) if value is not None else -math.inf)
        return out

    # ---------------------------------------------------------------- dev-mode control

    def pause(self, mode: str = "keep", clear_cache: bool = False) -> None:
        """Stop scheduling: `keep` freezes running requests, `wait` drains them, `abort`
        ends them (their callers see `GenerationAborted`). Needs dev mode."""
        if mode not in ("keep", "wait", "abort"):
            raise ValueError(f"unknown pause mode {mode!r}")
        self._request("POST", "/pause", params={"mode": mode, "clear_cache": str(clear_cache).lower()})

    def resume(self, timeout: float | None = None) -> None:
        self._request("POST", "/resume", timeout=timeout)

    @contextlib.contextmanager
    def paused(self, how: str) -> Iterator[None]:
        """`wait`: drain running requests, hold new ones, and resume on exit even if the body
        failed (a server left paused would hang every environment). `none`: no pause."""
        if how == "none":
            yield
            return
        if how != "wait":
            raise ValueError(f"unknown sync pause {how!r} (expected 'wait' or 'none')")
        try:
            self._request("POST", "/pause", params={"mode": "wait", "clear_cache": "false"},
                          timeout=self.pause_timeout)
        except VLLMError as exc:
            if exc.status_code is None and "did not answer" in str(exc):
                if not self.health():  # hung or gone, not busy with long generations
                    raise VLLMError(f"vLLM at {self.url} has not answered /pause within "
                                    f"{self.pause_timeout:g} s (--sync-timeout) nor /health "
                                    "after it: the server hangs or is gone; see its "
                                    "log") from exc
                # vLLM holds new requests from the moment /pause arrives, drained or not:
                # resume, or a server given with --vllm-url would stay paused after we exit.
                self._resume_quietly()
                raise VLLMError(f"vLLM at {self.url} did not finish its running requests "
                                f"within {self.pause_timeout:g} s (--sync-timeout) to pause "
                                "for a sync: raise --sync-timeout for long generations, or "
                                "sync without pausing (--sync-pause none)") from exc
            if exc.status_code != 404:
                raise
            raise VLLMError(f"vLLM at {self.url} has no /pause: start it with "
                            "VLLM_SERVER_DEV_MODE=1, or sync without pausing (--sync-pause "
                            "none)", 404) from exc
        try:
            yield
        finally:
            self.resume()

    def _resume_quietly(self) -> None:
        """Best-effort /resume on an error path: log, never raise over the real error."""
        try:
            self.resume(timeout=30)
        except (VLLMError, requests.RequestException) as exc:
            log.warning("could not resume vLLM at %s after a failed pause: %s", self.url, exc)

    def is_paused(self) -> bool:
        return bool(self._request("GET", "/is_paused", timeout=30).json()["is_paused"])

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop cached prefix blocks (needed after an in-place weight or adapter swap).
        Returns False when blocks were still held and the reset did not happen."""
        resp = self._request("POST", "/reset_prefix_cache",
                             params={"reset_running_requests": str(reset_running_requests).lower()})
        data = self._json(resp)
        return bool(data.get("success", True)) if isinstance(data, dict) else True

    def collective_rpc(self, method: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Call `method` on every worker (a worker-extension method, usually); one result per
        worker. vLLM passes args/kwargs through JSON, so keep them JSON-serialisable."""
        body: dict[str, Any] = {"method": method, "args": list(args), "kwargs": kwargs or {}}
        if timeout is not None:
            body["timeout"] = timeout
        http_timeout = None if timeout is None else max(self.timeout, timeout + 30)
        data = self._json(self._request("POST", "/collective_rpc", json=body, timeout=http_timeout))
        if isinstance(data, dict):
            return list(data.get("results", []))
        return []

    # ---------------------------------------------------------------- LoRA

    def load_lora_adapter(self, name: str, path: str, load_inplace: bool = False) -> str:
        """Register an adapter directory under `name`. On vLLM 0.32 `load_inplace=True`
        re-reads the directory on every engine step (docs/vllm-cpu.md, "Runtime LoRA"):
        prefer new names."""
        resp = self._request("POST", "/v1/load_lora_adapter",
                             json={"lora_name": name, "lora_path": str(path), "load_inplace": load_inplace})
        return resp.text

    def unload_lora_adapter(self, name: str) -> str:
        resp = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        return resp.text

    def post(self, path: str, body: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> requests.Response:
        """POST JSON to any endpoint (e.g. the dev-mode weight-transfer routes), raising
        VLLMError with vLLM's answer on failure."""
        return self._request("POST", path, json=body, timeout=timeout)
