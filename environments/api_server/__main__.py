"""Command line of the trajectory API: python -m environments.api_server --host H --port P."""

from __future__ import annotations

import argparse
import logging
import socket
import sqlite3

import uvicorn

from ..transport import API_TOKEN_ENV, api_token, exposed_without_secret, is_loopback
from .app import DEFAULT_MAX_REQUEST_MB, create_app
from .queue import DEFAULT_LEASE_TIMEOUT_S, MEMORY

log = logging.getLogger("environments.api_server")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m environments.api_server",
        description="Trajectory API (drop-in for Atropos run-api): environments post scored "
                    "groups, the trainer polls /batch.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any other than loopback needs a shared "
                             "secret (--api-token)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-queue-sequences", type=_positive_int, default=4096,
                        help="queue bound in sequences; posts beyond it get 429 + Retry-After")
    parser.add_argument("--max-request-mb", type=_positive_int,
                        default=DEFAULT_MAX_REQUEST_MB,
                        help="largest request body in MiB (after gzip decoding); larger "
                             "posts get 413")
    parser.add_argument("--queue-db", default=MEMORY, metavar="PATH",
                        help="SQLite file holding the queue, registrations, run state and "
                             "leases, so a restarted server loses nothing (created if "
                             f"missing); {MEMORY} (default) forgets everything on exit")
    parser.add_argument("--lease-timeout", type=_positive_float,
                        default=DEFAULT_LEASE_TIMEOUT_S, metavar="SECONDS",
                        help="a leased batch its trainer has neither acknowledged nor renewed "
                             "(by polling /batch) for this long returns to the queue head")
    parser.add_argument("--api-token", default=None, metavar="SECRET",
                        help="shared secret every request must carry as 'Authorization: "
                             f"Bearer SECRET' (else 401); default: ${API_TOKEN_ENV}, which "
                             "is preferred (a flag is visible in ps). Required unless --host "
                             "is loopback; without one a loopback server asks for none, as "
                             "Atropos' run-api")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="debug also logs every post and every HTTP request")
    return parser


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a busy port is one clear error rather than a trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging, serve until SIGINT/SIGTERM; 2 if the port is busy
    or the address is not loopback and no shared secret is set."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = api_token(args.api_token)
    if token is None and not is_loopback(args.host):
        log.error("%s", exposed_without_secret("the trajectory API", args.host, "--host"))
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as err:
        log.error("cannot listen on %s:%d: %s (is another server running there? choose "
                  "another --port)", args.host, args.port, err.strerror or err)
        return 2
    try:
        app = create_app(args.max_queue_sequences, args.max_request_mb << 20, args.queue_db,
                         args.lease_timeout, api_token=token)
    except sqlite3.Error as err:
        sock.close()
        log.error("cannot open the queue database %s: %s (check --queue-db)", args.queue_db,
                  err)
        return 2
    log.info("trajectory API listening on http://%s:%d (max_queue_sequences=%d, queue %s, %s)",
             args.host, sock.getsockname()[1], args.max_queue_sequences, args.queue_db,
             "bearer token required" if token else "no token: loopback only")
    config = uvicorn.Config(app, log_config=None,
                            log_level=args.log_level, access_log=args.log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
