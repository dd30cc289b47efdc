"""OpenAI-compatible serving on Ray Serve in front of a splitserve cluster (`splitserve serve`).

    protocol.py        request validation (400 naming the field) and response bodies
    detokenize.py      token ids -> streamed text, stop strings cut
    cluster_client.py  the poll thread that owns the front end; admission (429/503)
    metrics.py         Ray metrics + the JSON snapshot behind /metrics
    app.py             the Serve deployment (FastAPI ingress) and `build_app`
"""
