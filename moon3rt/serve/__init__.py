"""`moon3rt serve`: an OpenAI-compatible embedding server with cross-request dynamic batching.

Needs the ``serve`` extra (FastAPI, uvicorn, pydantic, prometheus-client):
``pip install 'moon3rt[serve]'``. `create_app(encoder, settings)` gives the ASGI app;
`run(settings, encoder)` serves it with uvicorn.
"""

from .app import ServeSettings, create_app, run

__all__ = ["ServeSettings", "create_app", "run"]
