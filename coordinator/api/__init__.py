"""`flashmesh serve`: an OpenAI-compatible HTTP API over one streaming model.

The HTTP layer (app.py) is a thin adapter over a plain-Python worker (worker.py) that owns the one
thread doing MLX work; requests reach it through a bounded queue and are served one at a time.
"""
