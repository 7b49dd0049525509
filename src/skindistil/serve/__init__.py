"""Serving: a FastAPI app (REST API + web page) over one model artifact, with dynamic micro-batching."""

from skindistil.serve.app import create_app
from skindistil.serve.batching import BatchStats, MicroBatcher
from skindistil.serve.server import serve_in_background

__all__ = ["BatchStats", "MicroBatcher", "create_app", "serve_in_background"]
