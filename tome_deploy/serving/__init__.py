"""Serving: the dynamic batcher, the KServe v2 codec, the HTTP app behind `tome-serve`, and Triton repositories.

The HTTP stack (starlette, uvicorn, prometheus-client) is the optional `serve` extra; only `app.py`,
`metrics.py` and `server.py` import it, and only when called.
"""
