"""An OpenAI- and Anthropic-compatible HTTP server for DiffusionGemma.

`python -m mlx_diffgemma.server --model M` (needs the `[server]` extra: FastAPI, uvicorn).

Modules: `protocol` (request bodies -> `GenRequest`), `prompt` (messages and tools -> the
chat template), `tools` (Gemma 4 tool-call format), `textstream` (stop strings, held tool
calls), `run` (one request on the model -> events), `worker` (the one model thread and
its queue), `formats` (events -> OpenAI / Anthropic JSON and SSE), `app` (HTTP, `main`).
"""

from .app import create_app, main

__all__ = ["create_app", "main"]
