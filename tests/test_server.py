"""The server as a real process on a free loopback port, driven by the official `openai` and
`anthropic` clients (and raw HTTP for faults). One server for the whole module."""

import json
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from server_process import ServerProcess

# Subprocess servers, CLIs or training: the full suite only (README: two tiers).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "x-max-tokens": 6},
        "age": {"type": "integer", "x-max-tokens": 3},
        "member": {"type": "boolean"},
        "scores": {
            "type": "array",
            "items": {"type": "number", "x-max-tokens": 4},
            "minItems": 2,
            "maxItems": 2,
        },
    },
    "required": ["name", "age", "member", "scores"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(tiny_checkpoint, log, "--queue-size", "8")
    yield srv.url
    assert srv.stop(), f"the server process died:\n{log.read_text()}"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="none", max_retries=0, timeout=60)


def _chat(oai, text, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("seed", 1)
    return oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], **kw
    )


def test_models_and_health(server, oai, tiny_checkpoint):
    # A short id, never the local path.
    assert [m.id for m in oai.models.list().data] == [tiny_checkpoint.name]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["worker"] in ("idle", "busy")


def test_chat_non_streaming_usage_and_seed(oai, tok):
    r = _chat(oai, "Why is the sky blue?")
    again = _chat(oai, "Why is the sky blue?")
    other = _chat(oai, "Why is the sky blue?", seed=2)
    assert r.choices[0].message.content == again.choices[0].message.content
    assert r.choices[0].message.content != other.choices[0].message.content
    prompt = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}])
    # The random tiny model never writes EOS: it runs to max_tokens.
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 16)
    assert r.usage.total_tokens == len(prompt) + 16


def test_fast_mode_is_a_request_field(oai, tiny, tok):
    from mlx_diffgemma import generate

    r = _chat(oai, "Why is the sky blue?", extra_body={"mode": "fast"})
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    model, _ = tiny
    expected = generate(model, tok, messages, max_tokens=16, seed=1, mode="fast")
    assert r.choices[0].message.content == expected
    settings = {"monotone_commit": True, "repair": 1, "top_k": 8}
    r = _chat(oai, "Why is the sky blue?", extra_body={"mode": "fast", **settings})
    expected = generate(model, tok, messages, max_tokens=16, seed=1, mode="fast", **settings)
    assert r.choices[0].message.content == expected


def test_chat_streaming_matches_non_streaming(oai):
    whole = _chat(oai, "Count to ten.", max_tokens=24)
    chunks = list(
        _chat(
            oai, "Count to ten.", max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) >= 2  # one per committed 8-token canvas (3 here)
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_thinking_end_to_end(oai):
    r = _chat(oai, "Think first.", reasoning_effort="high", max_tokens=24)
    plain = _chat(oai, "Think first.", max_tokens=24)
    msg = r.choices[0].message
    text = (msg.content or "") + (getattr(msg, "reasoning_content", None) or "")
    assert "<|channel>" not in text and "<channel|>" not in text
    # Thinking mode renders the `<|think|>` system turn: a longer prompt.
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens


def test_stop_string_ends_content(oai):
    whole = _chat(oai, "Tell a story.", max_tokens=24).choices[0].message.content
    stop = whole[10:14]
    r = _chat(oai, "Tell a story.", max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == whole[: whole.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_prompt_cache_reuse_across_turns(oai):
    first = _chat(oai, "Remember the number 7.", max_tokens=8)
    messages = [
        {"role": "user", "content": "Remember the number 7."},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Which number?"},
    ]
    second = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=1)
    # The first turn's prompt was encoded once; the second turn encodes only what follows it.
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    # The same request again finds no cache that prefixes it (the stored one holds this very
    # prompt), so it is encoded whole; the reply does not depend on that.
    again = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content


def test_completion_with_suffix(oai):
    kw = dict(model="tiny", prompt="def add(a, b):\n", suffix="\n    return c\n", seed=4)
    r = oai.completions.create(max_tokens=12, **kw)
    streamed = oai.completions.create(max_tokens=12, stream=True, **kw)
    text = r.choices[0].text
    assert text and "\n    return c" not in text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert r.usage.completion_tokens > 0
    plain = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, seed=4)
    assert plain.choices[0].text and plain.usage.completion_tokens == 8


def test_json_schema_output_validates(oai):
    r = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A person, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        seed=5,
    )
    value = json.loads(r.choices[0].message.content)
    assert set(value) == set(SCHEMA["properties"])
    assert isinstance(value["name"], str) and isinstance(value["member"], bool)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert len(value["scores"]) == 2 and all(isinstance(x, (int, float)) for x in value["scores"])
    # json_object: the model's own object, or (a random model never writes one) a clear
    # error after the re-samples; tests/test_server_units.py forces a valid one.
    with pytest.raises(openai.InternalServerError, match="did not write a JSON object"):
        _chat(oai, "Anything", response_format={"type": "json_object"}, max_tokens=16)
    with pytest.raises(openai.BadRequestError, match="pattern"):
        oai.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "p",
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"type": "string", "pattern": "x+"}},
                    },
                },
            },
        )


def test_tool_round_trip_openai(oai):
    first = _chat(oai, "Weather in Paris?", tools=[WEATHER_TOOL])
    assert first.choices[0].finish_reason in ("length", "stop", "tool_calls")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    r = oai.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=8, seed=1
    )
    assert r.choices[0].message.content and r.usage.prompt_tokens > first.usage.prompt_tokens


def test_anthropic_messages(claude):
    kw = dict(
        model="tiny",
        max_tokens=16,
        system="Be brief.",
        metadata={"user_id": "u"},
        extra_body={"seed": 3},
    )  # `seed`: this server's extension
    r = claude.messages.create(messages=[{"role": "user", "content": "Hi"}], **kw)
    assert r.content[0].type == "text" and r.stop_reason == "max_tokens"
    assert r.usage.output_tokens == 16 and r.usage.input_tokens > 0
    with claude.messages.stream(messages=[{"role": "user", "content": "Hi"}], **kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == r.content[0].text == final.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (r.usage.input_tokens, 16)
    tools = [
        {
            "name": "get_weather",
            "description": "Weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"}],
        },
    ]
    r = claude.messages.create(model="tiny", max_tokens=8, messages=messages, tools=tools)
    assert r.content and r.stop_reason in ("max_tokens", "end_turn", "tool_use")
    with pytest.raises(anthropic.BadRequestError, match="top_k"):
        claude.messages.create(
            model="tiny",
            max_tokens=8,
            extra_body={"top_k": 5},
            messages=[{"role": "user", "content": "x"}],
        )


def test_drafts_are_an_opt_in_extension(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "seed": 1,
        "stream": True,
        "include_drafts": True,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    drafts = [c["draft"] for c in chunks if "draft" in c]
    assert drafts and {"text", "block", "step", "accepted"} <= set(drafts[0])
    assert all(c["choices"][0]["delta"] == {} for c in chunks if "draft" in c)


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", b"[1, 2]", 400),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10000},
            400,
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, 400),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "unknown_field": 1},
            400,
        ),
        ("/v1/completions", {"prompt": "x", "suffix": "y", "max_tokens": -1}, 400),
        ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, 400),
    ],
)
def test_malformed_requests_get_4xx(server, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"content-type": "application/json"}
    r = httpx.post(server + path, timeout=30, headers=headers, **kw)
    assert r.status_code == status
    err = r.json()
    if path == "/v1/messages":
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    else:
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


def test_eight_clients_at_once_match_serial(server):
    def ask(client, i, k):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Client {i}, question {k}."}],
            max_tokens=8,
            seed=100 * i + k,
        )
        return r.choices[0].message.content

    serial_client = openai.OpenAI(base_url=server + "/v1", api_key="n", max_retries=0)
    tic = time.perf_counter()
    serial = {(i, k): ask(serial_client, i, k) for i in range(8) for k in range(2)}
    serial_s = time.perf_counter() - tic
    got, errors = {}, []

    def loop(i):
        client = openai.OpenAI(base_url=server + "/v1", api_key="n", max_retries=0, timeout=60)
        try:
            for k in range(2):  # bounded: two requests per client
                got[i, k] = ask(client, i, k)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    tic = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    print(
        f"16 requests: serial {serial_s:.2f} s, 8 clients at once {time.perf_counter() - tic:.2f} s"
    )
    assert not errors and got == serial


def _health(server):
    return httpx.get(server + "/health", timeout=5).json()


def _wait_idle(server, limit=15.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        h = _health(server)
        if not h["running"] and h["queued"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"the worker is still busy after {limit} s: {_health(server)}")


def test_client_disconnect_cancels_generation(server, oai):
    before = _health(server)["cancelled"]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "A long story."}],
        "max_tokens": 400,
        "stream": True,
        "seed": 1,
    }
    tic = time.perf_counter()
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # first committed canvas: now hang up
    h = _wait_idle(server)
    # 400 tokens are 50 canvases; the worker stopped long before finishing them.
    assert h["cancelled"] == before + 1
    assert time.perf_counter() - tic < 10
    assert _chat(oai, "Still there?", max_tokens=8).choices[0].message.content


def test_queue_full_gets_503(server, oai):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Busy?"}],
        "max_tokens": 400,
        "stream": True,
        "seed": 1,
    }
    results = [None] * 12

    def hold(i):
        # Hang up as soon as the reply starts (or after 4 s in the queue).
        try:
            with httpx.stream(
                "POST",
                server + "/v1/chat/completions",
                json=body,
                timeout=httpx.Timeout(10, read=4),
            ) as r:
                results[i] = (r.status_code, r.headers.get("retry-after"))
        except httpx.ReadTimeout:
            results[i] = ("waited", None)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    refused = [r for r in results if r[0] == 503]
    # One runs and 8 wait; the rest are refused, with a Retry-After.
    assert len(refused) >= 3 and all(r[1] for r in refused)
    assert all(r[0] in (200, 503, "waited") for r in results), results
    _wait_idle(server, 30)
    assert _chat(oai, "And now?", max_tokens=8).choices[0].message.content


def test_plain_schema_over_twenty_seeds_never_500(oai):
    """Issue 20's 500: a max_tokens larger than the JSON frame added free canvases whose
    ids the frame could not place. The reply costs the frame's canvases only."""
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "year": {"type": "integer"},
            "big": {"type": "boolean"},
        },
        "required": ["city", "year", "big"],
    }
    rf = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    for seed in range(20):
        r = oai.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "A city?"}],
            max_tokens=256,
            seed=seed,
            response_format=rf,
            extra_body={"max_denoising_steps": 3},
        )
        value = json.loads(r.choices[0].message.content)
        assert isinstance(value["city"], str) and isinstance(value["year"], int)
        assert isinstance(value["big"], bool)
        # Only the frame's canvases ran, not max_tokens' 32.
        assert r.usage.completion_tokens < 100, r.usage


def test_openai_sdk_parse_with_pydantic_models(oai):
    """`client.chat.completions.parse(response_format=Model)`: the SDK sends the strict
    schema pydantic builds ($defs/$ref, enum, anyOf with null, arrays, ...); every reply
    parses into the model."""
    from test_json_schema import MODELS

    for cls in MODELS:
        for seed in (0, 1):
            r = oai.chat.completions.parse(
                model="tiny",
                messages=[{"role": "user", "content": f"Give a {cls.__name__}."}],
                response_format=cls,
                seed=seed,
                extra_body={"max_denoising_steps": 1},
            )
            assert isinstance(r.choices[0].message.parsed, cls), (cls, r)


def test_unsupported_schema_keywords_are_400_naming_them(oai):
    for schema, word in [
        ({"type": "string", "pattern": "x+"}, "'pattern'"),
        ({"type": "string", "format": "email"}, "'format'"),
        ({"type": "object", "patternProperties": {"a": {}}}, "'patternProperties'"),
    ]:
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], response_format=rf
            )
        assert word in e.value.body["message"] and e.value.body["message"].startswith("$")
        assert e.value.body["param"] == "response_format.json_schema.schema"


def test_forced_tool_input_follows_its_schema(oai, claude):
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["C", "F"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
    }
    tool = {"type": "function", "function": {"name": "weather", "parameters": params}}
    r = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        seed=2,
        extra_body={"max_denoising_steps": 1},
    )
    call = r.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "weather" and r.choices[0].finish_reason == "tool_calls"
    assert args["unit"] in ("C", "F") and 1 <= args["days"] <= 7 and len(args["city"]) <= 20
    m = claude.messages.create(
        model="tiny",
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[{"name": "weather", "description": "Weather", "input_schema": params}],
        tool_choice={"type": "tool", "name": "weather"},
        extra_body={"max_denoising_steps": 1, "seed": 2},
    )
    block = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use" and block.name == "weather"
    assert block.input["unit"] in ("C", "F") and 1 <= block.input["days"] <= 7


def test_instructor_json_schema_and_tools_modes(server):
    """instructor (PyPI) in its JSON-schema mode (response_format json_schema) and its
    tools mode (a forced tool call): both parse into the model."""
    import instructor
    from test_json_schema import WithLiteral

    base = openai.OpenAI(base_url=server + "/v1", api_key="n", max_retries=0, timeout=60)
    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        client = instructor.from_openai(base, mode=mode)
        r = client.chat.completions.create(
            model="tiny",
            response_model=WithLiteral,
            messages=[{"role": "user", "content": "Yes or no?"}],
            max_retries=0,
            extra_body={"max_denoising_steps": 1, "seed": 4},
        )
        assert isinstance(r, WithLiteral) and 0 <= r.confidence <= 1
