"""Run a function on N CPU ranks (gloo), the way torchrun would start them, for the FSDP2
tests: each child gets torchrun's environment variables, runs `target(*args)` and leaves
its return value (or its traceback) in a file the parent reads back."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world: int, port: int, out: str, target: Callable[..., Any],
           args: tuple) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", target(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        result = ("error", traceback.format_exc())
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(Path(out) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_ranks(world: int, target: Callable[..., Any], *args: Any,
              timeout: float = 300) -> list[Any]:
    """`target(*args)` on `world` spawned ranks; their return values in rank order."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_child, args=(r, world, port, out, target, args))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for rank in range(world):
            file = Path(out) / f"rank{rank}.pkl"
            if not file.is_file():
                raise AssertionError(f"rank {rank} exited with {procs[rank].exitcode} and "
                                     "left no result")
            status, value = pickle.loads(file.read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
