"""The per-rank metrics HTTP endpoint: threaded, optional TLS and basic auth, port fallback.

It never blocks training: each scrape is served by its own daemon thread with a socket timeout
(a scraper that connects and never reads is dropped after ``timeout_s``), the TLS handshake runs
in that thread too (not in the accept loop), and the metrics are rendered to bytes before the
first byte is written, so no metric lock is held while a slow client reads.
"""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from moe_dist.config import ConfigError

log = logging.getLogger("moe_dist.telemetry")


class TelemetryError(ConfigError):
    """A telemetry setting that cannot work (busy port, unreadable certificate, missing password).
    A `ConfigError`, so the CLI reports it as one clean message and a non-zero exit."""

    def __init__(self, errors: str | list[str]) -> None:
        super().__init__([errors] if isinstance(errors, str) else errors)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds a client may stall before its thread gives up

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted job may rebind a port in TIME_WAIT

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, times out or speaks plain HTTP to TLS is its own problem.
        log.debug("telemetry: request from %s failed", client_address, exc_info=True)


class _ThreadingServerV6(_ThreadingServer):
    address_family = socket.AF_INET6


def basic_auth(app: Callable, user: str, password: str) -> Callable:
    """WSGI middleware: 401 unless the request carries ``user:password`` (constant-time compare)."""
    expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        got = environ.get("HTTP_AUTHORIZATION", "").encode()
        if hmac.compare_digest(got, expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="moe_dist"'), ("Content-Type", "text/plain")],
        )
        return [b"unauthorized\n"]

    return wrapped


def mark_scraped(app: Callable, scraped: threading.Event) -> Callable:
    """WSGI middleware: set ``scraped`` once a request was answered (after auth)."""

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        body = app(environ, start_response)
        scraped.set()
        return body

    return wrapped


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    scheme: str
    scraped: threading.Event

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _bind(app: Callable, host: str, port: int) -> WSGIServer:
    cls = _ThreadingServerV6 if ":" in host else _ThreadingServer
    return make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)


def start_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    fallback: bool,
    certfile: str | None = None,
    keyfile: str | None = None,
    auth: tuple[str, str] | None = None,
) -> MetricsServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread.

    1. Wrap the registry's WSGI app in basic auth when ``auth`` is given.
    2. Bind; on a busy port either raise `TelemetryError` or (``fallback``) bind a free port and warn.
    3. With a certificate, wrap the listening socket in TLS (handshake deferred to the handler).
    4. Run ``serve_forever`` in a daemon thread and return the actual address.
    """
    scraped = threading.Event()
    app = mark_scraped(make_wsgi_app(registry), scraped)
    if auth is not None:
        app = basic_auth(app, *auth)
    try:
        server = _bind(app, host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or not fallback:
            hint = (
                " (set telemetry.port_fallback: true to take a free port instead)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise TelemetryError(f"telemetry: cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
        server = _bind(app, host, 0)
        log.warning(
            "telemetry: port %d on %s is busy; serving metrics on port %d instead",
            port,
            host,
            server.server_address[1],
        )
    scheme = "http"
    if certfile:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            server.server_close()
            raise TelemetryError(f"telemetry.tls_cert/tls_key: cannot load {certfile}: {exc}") from None
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="moe-telemetry-http", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread, host, server.server_address[1], scheme, scraped)
