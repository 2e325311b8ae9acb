"""`simmim serve`: one process that loads a model once and serves a page and a JSON API."""

from .batching import Batcher
from .server import ServeSettings, load_served_model, make_server

__all__ = ["Batcher", "ServeSettings", "load_served_model", "make_server"]
