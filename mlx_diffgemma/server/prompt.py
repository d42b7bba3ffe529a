"""Chat messages of a request -> prompt token ids, through the checkpoint's chat template.

With tools, the declarations join the system turn, and an assistant message's calls and
the results of the tool messages after it join that model turn (Gemma 4 keeps a tool
exchange inside one model turn). A conversation that ends with tool results continues
that open model turn instead of starting a new one.
"""

from typing import Any, Dict, List, Optional, Tuple

from .protocol import GenRequest, Message, RequestError
from .tools import render_call, render_declarations, render_response


def has_tools(req: GenRequest) -> bool:
    """Whether the request needs the tool rendering (declared tools, calls or results)."""
    declared = bool(req.tools) and req.tool_choice != "none"
    used = any(m.tool_calls or m.role == "tool" for m in req.messages or ())
    return declared or used


def plain_messages(messages: List[Message]) -> List[Dict[str, Any]]:
    """Messages as the chat template takes them (no tool parts; image parts kept)."""
    return [{"role": m.role, "content": m.parts or m.content} for m in messages]


def has_images(req: GenRequest) -> bool:
    return any(m.parts for m in req.messages or ())


def _turns(messages: List[Message], declarations: str) -> Tuple[List[Dict[str, str]], bool]:
    """Template messages with tool parts inlined, and whether the last model turn is open."""
    out: List[Dict[str, str]] = []
    if declarations:
        if messages and messages[0].role == "system":
            first, messages = messages[0], messages[1:]
            out.append({"role": "system", "content": first.content.strip() + declarations})
        else:
            out.append({"role": "system", "content": declarations})
    open_turn = False
    calls: List[tuple] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            if not out or out[-1]["role"] != "assistant" or not calls:
                raise RequestError(
                    f"messages[{i}] is a tool result with no assistant tool call before it.",
                    "messages",
                )
            name = _call_name(calls, m.tool_call_id, i)
            out[-1]["content"] += render_response(name, m.content)
            open_turn = True
            continue
        open_turn = False
        if m.role == "assistant":
            calls = list(m.tool_calls)
            text = m.content + "".join(render_call(name, args) for _, name, args in calls)
            out.append({"role": "assistant", "content": text})
        else:
            calls = []
            out.append({"role": m.role, "content": m.content})
    return out, open_turn


def _call_name(calls: List[tuple], call_id: Optional[str], index: int) -> str:
    for cid, name, _ in calls:
        if call_id is not None and cid == call_id:
            return name
    if len(calls) == 1:
        return calls[0][1]
    raise RequestError(
        f"messages[{index}].tool_call_id {call_id!r} matches no call of the assistant message "
        "before it.",
        "messages",
    )


def tool_prompt_ids(tokenizer, req: GenRequest, enable_thinking: bool) -> List[int]:
    """Token ids of a conversation with tools (see the module docstring).

    Every string a client wrote (message text, tool declarations, call arguments, tool
    results) is `protect`ed before the tool format and the template wrap it, so none of
    it can become a control token (`<tool_call|>`, `<turn|>`, `<|"|>`, ...).
    """
    tools = _protected(tokenizer, req.tools)
    declarations = render_declarations(tools) if req.tool_choice != "none" else ""
    turns, open_turn = _turns(_protected_messages(tokenizer, req.messages), declarations)
    head, tail = (turns[:-1], turns[-1]["content"]) if open_turn else (turns, "")
    try:
        text = tokenizer.apply_chat_template(
            head, add_generation_prompt=True, enable_thinking=enable_thinking, tokenize=False
        )
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    return tokenizer.encode_rendered(text + tail)


def _protected(tokenizer, value):
    """`value` with every string in it (keys too) `protect`ed."""
    if isinstance(value, str):
        return tokenizer.protect(value)
    if isinstance(value, dict):
        return {_protected(tokenizer, k): _protected(tokenizer, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_protected(tokenizer, v) for v in value]
    return value


def _protected_messages(tokenizer, messages: List[Message]) -> List[Message]:
    out = []
    for m in messages:
        calls = [
            (cid, tokenizer.protect(name), _protected(tokenizer, args))
            for cid, name, args in m.tool_calls
        ]
        content = tokenizer.protect_messages([{"role": m.role, "content": m.content}])[0]["content"]
        out.append(Message(m.role, content, calls, m.tool_call_id))
    return out
