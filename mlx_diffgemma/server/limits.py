"""Every size, count and time the server bounds, in one place (docs/SERVER.md lists them).

A request is checked against these before anything is tokenized or allocated for it: a
value over a limit is a 400 naming the field and the limit, never a 500 or a slow refusal.
The HTTP limits (body size, timeouts, connections) have command-line flags; the rest are
fixed, because no honest request comes near them.
"""

# HTTP (flags of `python -m mlx_diffgemma.server`).
MAX_BODY_BYTES = 4 * 1024 * 1024  # --max-body-bytes: larger bodies get 413 unread
HEADER_TIMEOUT_S = 10.0  # --header-timeout: a connection must send its headers in this time
BODY_TIMEOUT_S = 30.0  # --body-timeout: the body must arrive in this time once the headers have
REQUEST_TIMEOUT_S = 300.0  # --request-timeout: a request's work ends at the next step after it
MAX_CONNECTIONS = 512  # --max-connections: more open connections are closed at once

# The JSON body.
MAX_JSON_DEPTH = 64  # nesting of objects and arrays

# Request fields.
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256  # text parts or content blocks of one message
MAX_TOOLS = 128
MAX_TOOL_CALLS = 64  # calls in one assistant message
MAX_STOP = 4  # OpenAI `stop` strings, as OpenAI allows
MAX_STOP_SEQUENCES = 16  # Anthropic `stop_sequences`
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_DENOISING_STEPS = 1024  # `max_denoising_steps` (the release uses at most 48)
MAX_REPAIR = 8  # fast mode's `repair` passes per canvas
MAX_TOP_K = 1024  # fast mode's `top_k` and `self_conditioning_top_k`
MAX_IMAGES = 8  # image parts in one request
MAX_IMAGE_BYTES = 3 * 1024 * 1024  # one image file, before base64
MAX_IMAGE_PIXELS = 4096 * 4096  # one image, read from its header before decoding
MAX_CANVAS_SHRINK = 4096  # fast mode's `canvas_shrink` (positions)
