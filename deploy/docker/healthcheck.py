"""HEALTHCHECK of the node images: exit 0 when the node's /readyz answers 200.

Slim images have no curl, so this is plain urllib. DNA_HEALTH_URL points it elsewhere
when `[ops] http_port` is not 7480.
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("DNA_HEALTH_URL", "http://127.0.0.1:7480/readyz")

try:
    with urllib.request.urlopen(URL, timeout=2) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except (OSError, urllib.error.URLError) as exc:
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
