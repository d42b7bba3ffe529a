"""Error bodies in the caller's API style: OpenAI's `{"error": {...}}` or Anthropic's
`{"type": "error", "error": {...}}`, for every status the server answers with."""

import json
from typing import List, Optional

_OPENAI = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_busy",
    504: "timeout",
}
_ANTHROPIC = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class RequestError(ValueError):
    """A bad request: HTTP `status`, a message, and the offending field (`param`)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def api_of(path: str) -> str:
    """Which API's error style a path answers in."""
    return "messages" if path.rstrip("/").endswith("/messages") else "openai"


def error_body(api: str, status: int, message: str, param: Optional[str] = None) -> dict:
    if api == "messages":
        kind = _ANTHROPIC.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _OPENAI.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def raw_response(
    api: str, status: int, message: str, param: Optional[str] = None, headers=()
) -> List[dict]:
    """An error as raw ASGI messages (for code below the framework)."""
    body = json.dumps(error_body(api, status, message, param)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers]
    start = {"type": "http.response.start", "status": status, "headers": head}
    return [start, {"type": "http.response.body", "body": body}]
