"""HTTP/3 requests with niquests (an HTTP client omx does not write), run by ``.venv-h3/bin/python``.

niquests brings urllib3-future, which replaces urllib3 in the environment it is installed in, so
``scripts/setup.sh --test`` gives it a virtualenv of its own (``.venv-h3``) and the tests call this
script as a subprocess. HTTP/1.1 and HTTP/2 are disabled: a request either goes over QUIC or fails.

Usage: ``niquests_h3.py BASE_URL CA_FILE`` with one JSON command per line on stdin; one JSON answer
per line on stdout (``http_version`` 30 means HTTP/3):

* ``{"get": PATH}`` -> ``{"status", "http_version", "json"}``
* ``{"stream": PATH, "body": {...}}`` -> ``{"status", "http_version", "lines": [...]}``, the NDJSON
  lines in the order ``iter_lines`` handed them over as they arrived
* ``{"upload": PATH, "file": FILE}`` -> ``{"status", "http_version", "json"}`` (POST of the file's bytes)
* any failure -> ``{"error": TYPE, "message": TEXT}``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import niquests


def run(session: Any, base: str, ca: str, command: dict[str, Any]) -> dict[str, Any]:
    if "get" in command:
        r = session.get(base + command["get"], verify=ca, timeout=60)
        return {"status": r.status_code, "http_version": r.http_version, "json": r.json()}
    if "stream" in command:
        r = session.post(base + command["stream"], json=command["body"], verify=ca, timeout=60, stream=True)
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        return {"status": r.status_code, "http_version": r.http_version, "lines": lines}
    if "upload" in command:
        data = Path(command["file"]).read_bytes()
        r = session.post(base + command["upload"], data=data, verify=ca, timeout=60)
        return {"status": r.status_code, "http_version": r.http_version,
                "json": r.json() if r.content else None}
    return {"error": "ValueError", "message": f"unknown command {command}"}


def main() -> None:
    base, ca = sys.argv[1], sys.argv[2]
    with niquests.Session(disable_http1=True, disable_http2=True) as session:
        for line in sys.stdin:
            try:
                answer = run(session, base, ca, json.loads(line))
            except Exception as exc:  # noqa: BLE001 - every failure is reported to the test
                answer = {"error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
