"""An OpenAI- and Anthropic-compatible HTTP server for DiffusionGemma.

`python -m mlx_diffgemma.server --model M` (needs the `[server]` extra: FastAPI, uvicorn).

Modules: `limits` (every bound, in one place), `http` (host check, JSON-only POSTs, body
cap, header timeout, connection cap), `errors` (error bodies in each API's shape),
`protocol` (request bodies -> `GenRequest`), `images` (inline image parts), `prompt`
(messages and tools -> the chat template), `tools` (Gemma 4 tool-call format),
`textstream` (stop strings, held tool calls), `run` (one request on the model -> events),
`worker` (the one model thread, its queue, step-level stopping), `formats` (events ->
OpenAI / Anthropic JSON and SSE), `app` (the routes, `main`).
"""

from .app import create_app, main

__all__ = ["create_app", "main"]
