"""The worker's HTTP endpoints on prometheus-client's own WSGI app and threading server, on a daemon thread:

    /metrics   the registry; text format 0.0.4, or OpenMetrics when the scraper asks for it (Accept header),
               gzip when asked (prometheus-client's content negotiation)
    /readyz    200 once the engine is loaded and warmed up and Redis answers, else 503 with the reason
    /livez     200 while the main loop has passed within --liveness-timeout (and all through loading), else 503
    /startupz  200 once the engine is loaded and warmed up (whatever Redis does), else 503: the startup probe

GET and HEAD everywhere (HEAD: the same status and headers, no body); any other method gets 405.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from worker.metrics import WorkerMetrics

StartResponse = Callable[..., object]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line each
        return


def health_app(metrics: WorkerMetrics) -> Callable[[dict, StartResponse], Iterable[bytes]]:
    """The WSGI application: /metrics from prometheus-client, the probes from `metrics`' state."""
    prometheus = make_wsgi_app(metrics.registry)

    def probe(path: str) -> tuple[bool, str]:
        if path == "/readyz":
            return metrics.readiness()
        if path == "/livez":
            alive = metrics.alive()
            return alive, "alive" if alive else "stuck: the worker loop has not passed"
        started = metrics.ready
        return started, "started" if started else "engine loading"

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"use GET or HEAD\n"]
        if path == "/metrics":
            reply: list = []
            body = b"".join(prometheus({**environ, "REQUEST_METHOD": "GET"},
                                       lambda status, headers, *_: reply.extend((status, headers))))
            start_response(reply[0], [*reply[1], ("Content-Length", str(len(body)))])
        elif path in ("/readyz", "/livez", "/startupz"):
            ok, reason = probe(path)
            body = f"{reason}\n".encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        else:
            body = b"not found: try /metrics, /readyz, /livez or /startupz\n"
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [] if method == "HEAD" else [body]

    return app


class MetricsServer:
    """Serves `health_app(metrics)` on host:port (port 0: any free port, see `.port`). `close()` stops it."""

    def __init__(self, metrics: WorkerMetrics, port: int, host: str = "0.0.0.0") -> None:
        self._server = make_server(host, port, health_app(metrics), ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
