"""Work in a daemon thread whose error reaches the caller.

The overlapped held-out evaluation, the final checkpoint's write and the HTTP half of every
weight sync run this way: daemon, because a hung vLLM must never keep the process from
exiting; a `Future`, because the caller must see the thread's error in its own thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable


def in_background(fn: Callable[[], Any], name: str) -> Future:
    """Start `fn` in a daemon thread named `name`; `result()` re-raises its error."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to whoever takes the result
            future.set_exception(err)
    threading.Thread(target=run, name=name, daemon=True).start()
    return future
