"""What the machine offers a vLLM server: a free port, and the CPU cores a core list names.

Kept apart from `server.py` (process control); `server` re-exports both port helpers, which
many callers import from there.
"""

from __future__ import annotations

import socket


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Try to bind host:port; a failure means someone else is listening there.

    SO_REUSEADDR, as uvicorn sets it, so that connections of a just-stopped server lingering
    in TIME_WAIT do not count as "in use" (they would block a restart on the same port).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_core_list(spec: str) -> set[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND value ("0", "0,2", "0-3", "0-1|2-3" for
    several workers); empty for the keywords vLLM also takes ("auto", "nobind", "all")."""
    cores: set[int] = set()
    for part in spec.replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            return set()
        cores.update(range(int(first), int(last if dash else first) + 1))
    return cores
