"""The HTTP app (FastAPI on uvicorn) and `main(argv)`.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages; GET /v1/models,
/health. Every request passes the HTTP limits (`http.py`), is parsed and checked here,
run by the one `Worker`, and written in its API's format. Errors are JSON in the caller's
API style, 404 and 405 included; the server keeps serving.
"""

import asyncio
import inspect
import logging
import os
import signal
import sys
import time
import types
from pathlib import Path
from typing import Iterable, List, Optional

import click

from ..options import CONTEXT_SETTINGS, run_command
from . import limits
from .errors import api_of, error_body
from .formats import AnthropicMessages, OpenAIChat, OpenAICompletion, sse
from .http import LOCAL_HOSTS, Guard, guarded_h11, host_name, raise_open_file_limit
from .prompt import has_images
from .protocol import RequestError, parse_chat, parse_completion, parse_json, parse_messages
from .worker import Job, QueueFull, Worker

RETRY_AFTER_S = 1  # what a refused client is told to wait
_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def _status(e: Exception) -> int:
    return getattr(e, "status", 500)


def _error(api: str, status: int, message: str, param=None, headers=None):
    from fastapi.responses import JSONResponse

    body = error_body(api, status, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def _stream_error(api: str, e: Exception) -> str:
    body = error_body(api, _status(e), str(e), getattr(e, "param", None))
    return sse(body, "error") if api == "messages" else sse(body)


async def _next_item(worker: Worker, job: Job, request):
    """The job's next `(kind, payload)`; a client that went away cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.out.get(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return ("gone", None)


async def _stream(worker: Worker, job: Job, first, fmt, api: str, request):
    """The SSE lines of a streamed reply; leaving early (hang-up) cancels the job."""
    done = False
    try:
        for line in fmt.start() + fmt.chunks(first):
            yield line
        while True:
            kind, payload = await _next_item(worker, job, request)
            if kind != "event":
                if kind == "error":
                    yield _stream_error(api, payload)
                return
            for line in fmt.chunks(payload):
                yield line
            if payload.kind == "done":
                done = True
                return
    finally:
        if not done:
            worker.cancel(job)  # stops the worker at its next step


async def _whole(worker: Worker, job: Job, first, fmt, api: str, request):
    """A reply in one JSON body, once the job is done."""
    from fastapi.responses import JSONResponse

    events = [first]
    while events[-1].kind != "done":
        kind, payload = await _next_item(worker, job, request)
        if kind == "error":
            return _error(api, _status(payload), str(payload), getattr(payload, "param", None))
        if kind != "event":
            return _error(api, 500, "The generation ended without a reply.")
        events.append(payload)
    return JSONResponse(fmt.body(events))


async def _serve(app_state, request, api: str, parse, fmt_cls):
    """Parse, queue, wait for the first event (errors before it are plain 4xx/5xx), reply."""
    from fastapi.responses import StreamingResponse

    worker = app_state.worker
    try:
        req = parse(parse_json(await request.body()))
        if req.include_drafts and not req.stream:
            raise RequestError("include_drafts needs stream: true.", "include_drafts")
        if has_images(req) and not worker.model.has_vision:
            raise RequestError(
                f"The model {app_state.model_id!r} has no vision tower (a text-only "
                "checkpoint), so it cannot take images; send text only, or serve a "
                "checkpoint converted with its vision tower.",
                "messages",
            )
    except RequestError as e:
        return _error(api, e.status, str(e), e.param)
    job = Job(req, asyncio.get_running_loop(), app_state.request_timeout)
    try:
        worker.submit(job)
    except QueueFull:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error(api, 503, "The server is busy (queue full); retry later.", None, headers)
    kind, first = await _next_item(worker, job, request)
    if kind == "error":
        return _error(api, _status(first), str(first), getattr(first, "param", None))
    if kind != "event":
        return _error(api, 500, "The generation ended without a reply.")
    fmt = fmt_cls(app_state.model_id, req.include_usage)
    if req.stream:
        body = _stream(worker, job, first, fmt, api, request)
        return StreamingResponse(body, media_type="text/event-stream")
    return await _whole(worker, job, first, fmt, api, request)


def served_name(model: str) -> str:
    """The id replies carry for `--model`: a local folder's name, or the hub repo id
    (a local path is never shown to clients)."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def create_app(
    model,
    tokenizer,
    model_id: str,
    queue_size: int = 8,
    cache_size: int = 4,
    *,
    request_timeout: float = limits.REQUEST_TIMEOUT_S,
    max_body_bytes: int = limits.MAX_BODY_BYTES,
    body_timeout: float = limits.BODY_TIMEOUT_S,
    allowed_hosts: Iterable[str] = LOCAL_HOSTS,
    docs: bool = False,
):
    """The FastAPI app serving `model` (one worker thread, started here).

    Args:
        model, tokenizer: the loaded model.
        model_id: the name `/v1/models` lists and replies carry.
        queue_size: requests that may wait besides the running one (more get 503).
        cache_size: prompt caches kept for reuse across requests.
        request_timeout: seconds a request may take, queue included (0: no limit).
        max_body_bytes: the largest request body (413 above it).
        body_timeout: seconds a body may take to arrive (408 after it; 0: no limit).
        allowed_hosts: host names the `Host` header may give ("*": any).
        docs: serve /docs, /redoc and /openapi.json.
    """
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException

    paths = ("/docs", "/redoc", "/openapi.json") if docs else (None, None, None)
    app = FastAPI(
        title="mlx_diffgemma", docs_url=paths[0], redoc_url=paths[1], openapi_url=paths[2]
    )
    app.add_middleware(
        Guard,
        allowed_hosts=allowed_hosts,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout or 1e9,
    )
    state = app.state
    state.worker = Worker(model, tokenizer, queue_size, cache_size)
    state.model_id, state.request_timeout = model_id, request_timeout
    created = int(time.time())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(api_of(request.url.path), e.status_code, str(e.detail), None, e.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        logging.getLogger("mlx_diffgemma.server").exception("request failed")
        return _error(api_of(request.url.path), 500, f"Internal error ({type(e).__name__}).")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(state, request, "chat", parse_chat, OpenAIChat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, "completions", parse_completion, OpenAICompletion)

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await _serve(state, request, "messages", parse_messages, AnthropicMessages)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx_diffgemma"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        from fastapi.responses import JSONResponse

        stats = state.worker.stats()
        ok = stats["worker"] != "stuck"
        return JSONResponse({"status": "ok" if ok else "stuck", **stats}, 200 if ok else 503)

    return app


# The HTTP limits' flags: (flag, type, default, help); the defaults live in limits.py.
_LIMIT_FLAGS = [
    (
        "--request-timeout",
        click.FloatRange(min=0),
        limits.REQUEST_TIMEOUT_S,
        "Seconds a request may take, queue included; its work stops at the next denoising "
        "step after it (0: no limit).",
    ),
    (
        "--max-body-bytes",
        click.IntRange(min=1),
        limits.MAX_BODY_BYTES,
        "Largest request body; larger get 413.",
    ),
    (
        "--header-timeout",
        click.FloatRange(min=0),
        limits.HEADER_TIMEOUT_S,
        "Seconds a connection may take to send a request head before it is closed.",
    ),
    (
        "--body-timeout",
        click.FloatRange(min=0),
        limits.BODY_TIMEOUT_S,
        "Seconds a request body may take once its head has arrived (408 after it).",
    ),
    (
        "--max-connections",
        click.IntRange(min=1),
        limits.MAX_CONNECTIONS,
        "Open connections at most; more are closed.",
    ),
]


def _limit_options(command):
    for flag, kind, default, text in reversed(_LIMIT_FLAGS):
        command = click.option(flag, type=kind, default=default, show_default=True, help=text)(
            command
        )
    return command


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


@click.command(name="serve", context_settings=CONTEXT_SETTINGS)
@click.option("--model", required=True, help="Local checkpoint folder or hub repo id.")
@click.option("--adapter-path", default=None, help="LoRA adapter folder (from the tuner).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--served-model-name",
    default=None,
    help="The model id replies and /v1/models give [default: the folder or repo name].",
)
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests that may wait besides the running one; more get 503.",
)
@click.option(
    "--prompt-cache-size",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Prompt caches kept for reuse across requests.",
)
@_limit_options
@click.option(
    "--allowed-hosts",
    default="",
    help="Comma-separated host names the Host header may also give, besides the bound "
    "host, localhost, 127.0.0.1 and ::1 ('*': any; needed behind a proxy or a LAN name).",
)
@click.option("--docs", is_flag=True, help="Serve /docs, /redoc and /openapi.json [off].")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    default="INFO",
    show_default=True,
)
def serve_command(**params):
    """Serve the model over OpenAI- and Anthropic-compatible HTTP APIs.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /health.
    """
    args = types.SimpleNamespace(**params)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
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
    hosts = [*LOCAL_HOSTS, host_name(args.host)]
    hosts += [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    app = create_app(
        model,
        tokenizer,
        args.served_model_name or served_name(args.model),
        args.queue_size,
        args.prompt_cache_size,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        allowed_hosts=hosts,
        docs=args.docs,
    )
    _run(app, args, uvicorn)


def _run(app, args, uvicorn):
    """uvicorn with the HTTP limits; a shutdown signal stops the worker at its next step
    (in-flight clients get a 503), and the process waits for it, so MLX is never torn
    down mid-computation (a second Ctrl-C would otherwise abort the process)."""
    worker = app.state.worker
    files = raise_open_file_limit(args.max_connections + 256)
    max_connections = min(args.max_connections, max(16, files - 64))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker.close()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, which would end the
            # process before the worker stopped; the exit below is the clean one.
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        http=guarded_h11(args.header_timeout or 1e9, max_connections),
        timeout_graceful_shutdown=10,
    )
    Server(config).run()
    # The running job stops at its next denoising step; a further signal meanwhile must
    # not tear MLX down under it (that aborts the process).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if not worker.close(timeout=60):
        logging.getLogger("mlx_diffgemma.server").error("the worker did not stop; exiting")
        os._exit(1)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m mlx_diffgemma.server --model M [--adapter-path A] [--host H] [--port P]`."""
    run_command(serve_command, argv, "python -m mlx_diffgemma.server")
