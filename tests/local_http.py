"""Tiny real HTTP servers on 127.0.0.1 for tests: a server running on a thread, and JSON answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


@contextmanager
def serving(httpd: HTTPServer) -> Iterator[HTTPServer]:
    """`httpd` answering from a background thread inside the block; shut down and closed after it."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> None:
    """One whole response: status, Content-Type, Content-Length, extra `headers`, then `data`."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    send(handler, status, json.dumps(payload).encode(), headers=headers)
