"""The framework floor: a Flask app that does nothing but what every CDS Hooks call must do.

It reads the request body, parses it as JSON (orjson, as the service does) and answers a fixed small card
list. Run under the same gunicorn configuration as the service, it measures what Flask + gunicorn sync
workers + the JSON round trip cost on this machine; the service's throughput is reported against it.
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

app = Flask("cmv_cds_bench_noop")

_CARDS = orjson.dumps(
    {
        "cards": [
            {
                "uuid": "00000000-0000-4000-8000-000000000000",
                "summary": "No-op card",
                "indicator": "info",
                "source": {"label": "bench"},
            }
        ]
    }
)


@app.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    body = orjson.loads(request.get_data(cache=False))
    if not isinstance(body, dict) or "context" not in body:
        return Response(b'{"error":"bad request"}', status=400, mimetype="application/json")
    return Response(_CARDS, mimetype="application/json")


@app.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', mimetype="application/json")
