"""A real vLLM server on the tiny model: process control, token-id generation, parity.

One module-scoped server (CPU, fp32, eager, dev mode, 64 MiB KV cache, worker on core 0)
serves most tests; each start-up takes 20-90 s on a busy 2-core machine, so the module
starts only two healthy servers (the shared one and its restart) plus one that fails fast.
"""

from __future__ import annotations

import math
import os
import socket
import threading

import pytest
import requests
import torch

from example_trainer.parity import (
    DEFAULT_ATOL,
    ParityError,
    check_parity,
    default_probe_tokens,
    trainer_probe_logprobs,
)
from example_trainer.vllm import (
    GenerationAborted,
    PortInUseError,
    VLLMClient,
    VLLMServer,
    VLLMStartupError,
    free_port,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GEN_TOL = 1e-4  # sampled-token log-probs, fp32 vLLM vs fp32 transformers (measured ~1e-6)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def server_options(tmp_dir) -> dict:
    return dict(enforce_eager=True, dev_mode=True, max_model_len=512, kv_cache_memory_bytes="64M",
                cpu_cores="0", log_path=tmp_dir / "vllm.log", startup_timeout=600)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = VLLMServer(tiny_model_dir, port=free_port(), **server_options(tmp_path_factory.mktemp("vllm")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> VLLMClient:
    return server.client(timeout=300)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def probe(tokenizer) -> list[int]:
    return default_probe_tokens(tokenizer)


def running_requests(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_and_models(server, client):
    assert server.alive() and server.startup_seconds > 0
    assert client.health()
    assert client.wait_healthy(timeout=5) >= 0
    assert client.models() == [server.model_name]
    assert server.pgid == server.pid


def test_every_vllm_process_keeps_to_the_worker_cores(server):
    """The API server and the engine core run on the worker's cores too: inheriting this
    process's affinity put them on a pinned trainer's core, beside its training steps."""
    members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _in_group(int(p),
                                                                               server.pgid)]
    assert len(members) >= 3, members  # API server, engine core, worker (and helpers)
    assert {pid: os.sched_getaffinity(pid) for pid in members} == dict.fromkeys(members, {0})


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except ProcessLookupError:
        return False


def test_core_lists_parse_as_vllm_reads_them():
    from example_trainer.vllm.host import parse_core_list
    assert parse_core_list("0") == {0}
    assert parse_core_list("0,2") == {0, 2}
    assert parse_core_list("1-3") == {1, 2, 3}
    assert parse_core_list("0-1|4-5") == {0, 1, 4, 5}  # one range per worker
    assert parse_core_list("auto") == parse_core_list("nobind") == set()


def test_default_probe_is_deterministic_chat(tokenizer, probe):
    assert probe == default_probe_tokens(tokenizer)
    text = tokenizer.decode(probe)
    assert "What is 2+3?" in text and "<|im_start|>assistant" in text


def test_completions_match_trainer_logprobs(client, trainer_model, probe):
    prompts = [probe[:-4], probe[:6]]
    outs = client.completions(prompts, n=3, max_tokens=24, temperature=1.0, seed=1234)
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1]
    for out in outs:
        assert out.finish_reason in ("length", "stop")
        assert 0 < len(out.token_ids) <= 24 and len(out.logprobs) == len(out.token_ids)
        assert all(math.isfinite(v) and v <= 0 for v in out.logprobs)
        prompt = prompts[out.prompt_index]
        ours = trainer_probe_logprobs(trainer_model, prompt + out.token_ids)[len(prompt) - 1:]
        err = (ours - torch.tensor(out.logprobs)).abs().max().item()
        assert err < GEN_TOL, f"sampled-token log-probs differ by {err}"
    # a single prompt (flat id list) gives n completions; the same seed gives the same tokens
    a = client.completions(probe[:10], n=2, max_tokens=8, temperature=1.0, seed=7)
    b = client.completions(probe[:10], n=2, max_tokens=8, temperature=1.0, seed=7)
    assert len(a) == 2 and [c.token_ids for c in a] == [c.token_ids for c in b]


def test_prompt_logprob_parity(client, trainer_model, probe):
    values = client.prompt_logprobs(probe)
    assert len(values) == len(probe) - 1 and all(math.isfinite(v) for v in values)
    err = check_parity(trainer_model, client, probe)
    assert err <= DEFAULT_ATOL
    # a model whose weights differ from the served ones must fail loudly
    import copy
    other = copy.deepcopy(trainer_model)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    with pytest.raises(ParityError, match="does not serve the trainer's weights"):
        check_parity(other, client, probe)


def test_pause_keep_resume_and_reset_cache(client, probe):
    client.pause(mode="keep")
    try:
        assert client.is_paused()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(
            out=client.completions(probe[:8], max_tokens=4, temperature=1.0, ignore_eos=True)))
        worker.start()
        worker.join(timeout=2.0)
        assert worker.is_alive(), "a request finished while the server was paused"
    finally:
        client.resume()
    worker.join(timeout=300)
    assert not worker.is_alive() and len(result["out"][0].token_ids) == 4
    assert not client.is_paused()
    assert client.reset_prefix_cache() is True
    assert client.collective_rpc("check_health") == [None]  # one result per worker


def test_pause_abort_raises_generation_aborted(server, client, probe):
    caught: dict = {}

    def generate() -> None:
        try:
            caught["out"] = client.completions(probe[:4], n=32, max_tokens=480, temperature=1.0,
                                               ignore_eos=True)
        except GenerationAborted as exc:
            caught["exc"] = exc

    worker = threading.Thread(target=generate)
    worker.start()
    while running_requests(server.url) < 1 and worker.is_alive():
        worker.join(timeout=0.05)
    client.pause(mode="abort")
    try:
        worker.join(timeout=300)
    finally:
        client.resume()
    assert "exc" in caught, "32 x 480 tokens finished before the pause (or the abort was lost)"
    assert caught["exc"].partial and all(c.finish_reason == "abort" for c in caught["exc"].partial)
    assert len(client.completions(probe[:4], max_tokens=2)[0].token_ids) == 2


def test_a_pause_that_times_out_leaves_the_server_resumed(server, client, probe):
    """vLLM holds new requests from the moment /pause arrives: when the drain outlasts the
    sync timeout, the client must resume before it raises, or a server given with
    --vllm-url would stay paused for good."""
    from example_trainer.vllm import VLLMError
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=client.completions(
        probe[:4], n=32, max_tokens=480, temperature=1.0, ignore_eos=True)))
    worker.start()
    while running_requests(server.url) < 1 and worker.is_alive():
        worker.join(timeout=0.05)
    impatient = VLLMClient(server.url, timeout=300, pause_timeout=0.5)
    try:
        with pytest.raises(VLLMError, match="did not finish its running requests"):
            with impatient.paused("wait"):
                pytest.fail("the pause should have timed out")
        assert not client.is_paused()
    finally:
        worker.join(timeout=300)
        client.resume()
    assert len(result["out"]) == 32  # the running generation went on to its end
    assert len(client.completions(probe[:4], max_tokens=2)[0].token_ids) == 2


def test_client_errors_carry_server_text(client, probe):
    from example_trainer.vllm import VLLMError
    with pytest.raises(VLLMError, match="does not exist") as info:
        client.completions(probe[:4], max_tokens=2, model="no-such-model")
    assert info.value.status_code == 404


def test_port_in_use_starts_nothing(tiny_model_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        srv = VLLMServer(tiny_model_dir, port=port, **server_options(tmp_path))
        with pytest.raises(PortInUseError, match=f"port {port} .* already in use"):
            srv.start()
    assert srv.pid is None and not srv.alive()
    assert not (tmp_path / "vllm.log").exists()


def test_missing_vllm_gives_install_hint(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    import example_trainer.vllm.server as server_mod
    real = importlib.util.find_spec
    monkeypatch.setattr(server_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    srv = VLLMServer(tiny_model_dir, port=free_port(), gpu=False, **server_options(tmp_path))
    with pytest.raises(VLLMStartupError, match=r"pip install 'example-trainer\[cpu\]'"):
        srv.start()
    assert srv.pid is None


def test_broken_model_dir_raises_with_log(tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{ this is not json")
    srv = VLLMServer(model_dir, port=free_port(), **server_options(tmp_path))
    with pytest.raises(VLLMStartupError) as info:
        srv.start()
    message = str(info.value)
    assert str(srv.log_path) in message and "last 30 log lines" in message
    assert "config.json" in message  # transformers' complaint about the corrupt config
    quoted = message.split("log lines:\n", 1)[1].strip().splitlines()
    assert quoted and all(line in srv.log_path.read_text() for line in quoted)
    assert info.value.pgid is not None and not group_exists(info.value.pgid)
    assert not srv.alive() and srv.pid is None


def test_restart_then_stop_removes_process_group(server, client, tiny_model_dir):
    """Runs last: restarts the shared server (the legacy mode's path), then stops it."""
    old_pgid = server.pgid
    seconds = server.restart(tiny_model_dir)
    assert seconds > 0 and not group_exists(old_pgid)
    assert client.health() and client.models() == [server.model_name]
    pgid = server.pgid
    assert group_exists(pgid)
    server.stop()
    assert not group_exists(pgid)
    assert not server.alive() and server.pid is None and server.pgid is None
    server.stop()  # idempotent
    assert not client.health()
    # the log kept both runs' output and the command lines
    header = [line for line in server.tail_log(100_000) if line.startswith("# example_trainer:")]
    assert len(header) == 2 and str(tiny_model_dir) in header[-1]


def test_full_weight_sender_names_a_server_without_weight_transfer(client, trainer_model):
    """A vLLM started without --weight-transfer-config refuses the engine's init: the join
    fails with vLLM's answer (the HTTP call's error), not only a rendezvous timeout."""
    from example_trainer.weight_sync import WeightSyncError
    from example_trainer.weight_transfer import FullWeightSender
    sender = FullWeightSender(client, trainer_model, bucket_mib=1, timeout_s=5, backend="gloo")
    with pytest.raises(WeightSyncError, match="/init_weight_transfer_engine failed in vLLM"):
        sender.join()
