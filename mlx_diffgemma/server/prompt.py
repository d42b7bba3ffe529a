"""Chat messages of a request -> prompt token ids, through the checkpoint's chat template.

With tools, the declarations join the system turn, and an assistant message's calls and
the results of the tool messages after it join that model turn (Gemma 4 keeps a tool
exchange inside one model turn). A conversation that ends with tool results continues
that open model turn instead of starting a new one.
"""

from typing import Dict, List, Optional, Tuple

from .protocol import GenRequest, Message, RequestError
from .tools import render_call, render_declarations, render_response


def has_tools(req: GenRequest) -> bool:
    """Whether the request needs the tool rendering (declared tools, calls or results)."""
    declared = bool(req.tools) and req.tool_choice != "none"
    used = any(m.tool_calls or m.role == "tool" for m in req.messages or ())
    return declared or used


def plain_messages(messages: List[Message]) -> List[Dict[str, str]]:
    """Messages as the chat template takes them (no tool parts)."""
    return [{"role": m.role, "content": m.content} for m in messages]


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
    """Token ids of a conversation with tools (see the module docstring)."""
    declarations = render_declarations(req.tools) if req.tool_choice != "none" else ""
    turns, open_turn = _turns(req.messages, declarations)
    head, tail = (turns[:-1], turns[-1]["content"]) if open_turn else (turns, "")
    try:
        text = tokenizer.apply_chat_template(
            head, add_generation_prompt=True, enable_thinking=enable_thinking, tokenize=False
        )
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    text += tail
    bos = tokenizer.bos_token
    if text.startswith(bos):
        return [tokenizer.bos_token_id] + tokenizer.encode(text[len(bos) :])
    return tokenizer.encode(text)
