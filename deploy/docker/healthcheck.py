"""HEALTHCHECK of the node images: exit 0 when the node's /readyz answers 200.

Slim images have no curl; a bare socket rather than urllib because a check runs every few
seconds in every container (run with `python3 -I -S`: no site, about half urllib's start-up).
DNA_HEALTH_URL (http://HOST:PORT/PATH) points it elsewhere when `[ops] http_port` is not 7480.
"""

import os
import socket
import sys

URL = os.environ.get("DNA_HEALTH_URL", "http://127.0.0.1:7480/readyz")


def status(url: str) -> int:
    address, _, path = url.removeprefix("http://").partition("/")
    host, _, port = address.partition(":")
    with socket.create_connection((host, int(port or 80)), timeout=5) as conn:
        conn.sendall(f"GET /{path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        head = conn.makefile("rb").readline().decode("latin-1")  # HTTP/1.1 200 OK
    return int(head.split()[1])


try:
    code = status(URL)
except (OSError, ValueError, IndexError) as exc:
    sys.exit(f"not ready: {exc}")
sys.exit(0 if code == 200 else f"not ready: HTTP {code}")
