"""The HTTP app (FastAPI on uvicorn) and `main(argv)`.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages; GET /v1/models,
/health. Every request is parsed and checked here, run by the one `Worker`, and written
in its API's format. Errors are JSON in the caller's API style; the server keeps serving.
"""

import argparse
import asyncio
import inspect
import logging
import queue
import sys
import time
from typing import List, Optional

from ..options import passthrough_command
from .formats import AnthropicMessages, OpenAIChat, OpenAICompletion, sse
from .protocol import RequestError, parse_chat, parse_completion, parse_json, parse_messages
from .worker import Job, Worker

RETRY_AFTER_S = 1  # what a refused client is told to wait
_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def _error_body(api: str, status: int, message: str, param: Optional[str] = None) -> dict:
    if api == "messages":
        kind = {400: "invalid_request_error", 503: "overloaded_error"}.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = {400: "invalid_request_error", 503: "server_busy"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _status(e: Exception) -> int:
    if isinstance(e, RequestError):
        return e.status
    return 500


def _error(api: str, status: int, message: str, param=None, headers=None):
    from fastapi.responses import JSONResponse

    body = _error_body(api, status, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def _stream_error(api: str, e: Exception) -> str:
    body = _error_body(api, _status(e), str(e))
    return sse(body, "error") if api == "messages" else sse(body)


async def _next_item(job: Job, request):
    """The job's next `(kind, payload)`; a client that went away cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.out.get(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return ("gone", None)


async def _stream(job: Job, first, fmt, api: str, request):
    """The SSE lines of a streamed reply; leaving early (hang-up) cancels the job."""
    try:
        for line in fmt.start() + fmt.chunks(first):
            yield line
        while True:
            kind, payload = await _next_item(job, request)
            if kind != "event":
                if kind == "error":
                    yield _stream_error(api, payload)
                return
            for line in fmt.chunks(payload):
                yield line
            if payload.kind == "done":
                return
    finally:
        job.cancelled.set()  # a no-op after "done"; stops the worker otherwise


async def _whole(job: Job, first, fmt, api: str, request):
    """A reply in one JSON body, once the job is done."""
    from fastapi.responses import JSONResponse

    events = [first]
    while events[-1].kind != "done":
        kind, payload = await _next_item(job, request)
        if kind == "error":
            return _error(api, _status(payload), str(payload))
        if kind != "event":
            return _error(api, 500, "The generation ended without a reply.")
        events.append(payload)
    return JSONResponse(fmt.body(events))


async def _serve(worker: Worker, model_id: str, request, api: str, parse, fmt_cls):
    """Parse, queue, wait for the first event (errors before it are plain 4xx/5xx), reply."""
    from fastapi.responses import StreamingResponse

    try:
        req = parse(parse_json(await request.body()))
        if req.include_drafts and not req.stream:
            raise RequestError("include_drafts needs stream: true.", "include_drafts")
    except RequestError as e:
        return _error(api, e.status, str(e), e.param)
    job = Job(req, asyncio.get_running_loop())
    try:
        worker.submit(job)
    except queue.Full:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error(api, 503, "The server is busy (queue full); retry later.", None, headers)
    kind, first = await _next_item(job, request)
    if kind == "error":
        return _error(api, _status(first), str(first), getattr(first, "param", None))
    if kind != "event":
        return _error(api, 500, "The generation ended without a reply.")
    fmt = fmt_cls(model_id, req.include_usage)
    if req.stream:
        body = _stream(job, first, fmt, api, request)
        return StreamingResponse(body, media_type="text/event-stream")
    return await _whole(job, first, fmt, api, request)


def create_app(model, tokenizer, model_id: str, queue_size: int = 8, cache_size: int = 4):
    """The FastAPI app serving `model` (one worker thread, started here).

    Args:
        model, tokenizer: the loaded model.
        model_id: the name `/v1/models` lists and replies carry.
        queue_size: requests that may wait besides the running one (more get 503).
        cache_size: prompt caches kept for reuse across requests.
    """
    from fastapi import FastAPI, Request

    app = FastAPI(title="mlx_diffgemma")
    worker = Worker(model, tokenizer, queue_size, cache_size)
    app.state.worker = worker
    created = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(worker, model_id, request, "chat", parse_chat, OpenAIChat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        fmt = OpenAICompletion
        return await _serve(worker, model_id, request, "completions", parse_completion, fmt)

    @app.post("/v1/messages")
    async def messages(request: Request):
        fmt = AnthropicMessages
        return await _serve(worker, model_id, request, "messages", parse_messages, fmt)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx_diffgemma"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **worker.stats()}

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_diffgemma.server",
        description="OpenAI- and Anthropic-compatible HTTP server for DiffusionGemma.",
    )
    p.add_argument("--model", required=True, help="Local checkpoint folder or hub repo id.")
    p.add_argument("--adapter-path", default=None, help="LoRA adapter folder (from the tuner).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind [default: 127.0.0.1].")
    p.add_argument("--port", type=int, default=8080, help="Port [default: 8080].")
    p.add_argument(
        "--queue-size",
        type=int,
        default=8,
        help="Requests that may wait besides the running one; more get 503 [default: 8].",
    )
    p.add_argument(
        "--prompt-cache-size",
        type=int,
        default=4,
        help="Prompt caches kept for reuse across requests [default: 4].",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def load_model(model: str, adapter_path: Optional[str]):
    """`load(model)`, with the adapter when given (needs a `load` that takes adapter_path)."""
    from .. import load

    if adapter_path is None:
        return load(model)
    if "adapter_path" not in inspect.signature(load).parameters:
        raise ValueError(
            "--adapter-path needs a build whose load() applies adapters (the tuner); "
            "fuse the adapter into the model first or drop the flag."
        )
    return load(model, adapter_path=adapter_path)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m mlx_diffgemma.server --model M [--adapter-path A] [--host H] [--port P]`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if args.queue_size < 1:
        sys.exit(f"Error: --queue-size must be at least 1 (got {args.queue_size}).")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        sys.exit(
            f"Error: the server needs the [server] extra ({e.name} is missing): "
            "pip install 'mlx-diffgemma[server]'."
        )
    try:
        model, tokenizer = load_model(args.model, args.adapter_path)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"Error: {e}")

    app = create_app(model, tokenizer, args.model, args.queue_size, args.prompt_cache_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


serve_command = passthrough_command(
    "serve", main, "Serve the model over OpenAI- and Anthropic-compatible HTTP APIs."
)
