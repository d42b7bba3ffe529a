"""The server seen by its clients: a transcript, concurrency figures, time to first token.

Starts `python -m mlx_diffgemma.server --model MODEL` on a free loopback port, then:

1. transcript: one call of each kind with the official `openai` / `anthropic` clients,
   request and (abbreviated) reply;
2. concurrency: `--clients` clients at once, `--requests` each, against the same requests
   run one after another (wall time, and whether every reply equals its serial run);
3. time to first token over HTTP (streamed chat, thinking off and on), and, in process,
   the reply pipeline on a forced thinking answer (the model's output clamped to
   `<|channel>thought ...<channel|>answer`, as a random model writes no thoughts): time to
   the first reasoning delta vs the first answer delta.

    python -m benchmarks.server_clients --model PATH
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai

REPO = Path(__file__).resolve().parents[1]


def start(model: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlx_diffgemma.server", "--model", model, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd + ["--log-level", "WARNING"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def show(title, request, reply):
    clip = lambda s: s if len(s) <= 400 else s[:400] + " ..."  # noqa: E731
    print(f"\n### {title}\n> {clip(json.dumps(request, ensure_ascii=False))}")
    print(f"< {clip(json.dumps(reply, ensure_ascii=False))}")


def transcript(url):
    oai = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    user = [{"role": "user", "content": "Why is the sky blue?"}]
    req = dict(model="m", messages=user, max_tokens=16, seed=1)
    show("openai chat", req, oai.chat.completions.create(**req).model_dump(exclude_none=True))
    req = dict(req, stream=True, stream_options={"include_usage": True})
    chunks = [c.model_dump(exclude_none=True) for c in oai.chat.completions.create(**req)]
    show(
        f"openai chat, stream ({len(chunks)} chunks; first, second, last two)",
        req,
        chunks[:2] + chunks[-2:],
    )
    req = dict(
        model="m", prompt="def add(a, b):\n", suffix="\n    return c\n", max_tokens=8, seed=1
    )
    show("openai completions + suffix", req, oai.completions.create(**req).model_dump())
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "x-max-tokens": 6}, "age": {"type": "integer"}},
    }
    req = dict(
        model="m",
        messages=user,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    show(
        "openai json_schema", req, oai.chat.completions.create(**req).model_dump(exclude_none=True)
    )
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
    ]
    req = dict(model="m", messages=msgs, tools=[tool], max_tokens=8, seed=1)
    show(
        "openai tool result round trip",
        req,
        oai.chat.completions.create(**req).model_dump(exclude_none=True),
    )
    req = dict(model="m", max_tokens=16, system="Be brief.", messages=user)
    show("anthropic messages", req, claude.messages.create(**req).model_dump(exclude_none=True))
    try:
        oai.chat.completions.create(model="m", messages=user, max_tokens=0)
    except openai.BadRequestError as e:
        show("openai bad request", {"max_tokens": 0}, {"status": e.status_code, **e.body})


def concurrency(url, clients: int, requests: int, max_tokens: int):
    def ask(client, i, k):
        tic = time.perf_counter()
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Client {i}, question {k}."}],
            max_tokens=max_tokens,
            seed=100 * i + k,
        )
        return r.choices[0].message.content, time.perf_counter() - tic

    one = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    tic = time.perf_counter()
    serial = {(i, k): ask(one, i, k) for i in range(clients) for k in range(requests)}
    serial_s = time.perf_counter() - tic
    got = {}

    def loop(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        for k in range(requests):
            got[i, k] = ask(c, i, k)

    tic = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    n = clients * requests
    same = all(got[k][0] == serial[k][0] for k in serial)
    lat = [v[1] for v in got.values()]
    print(f"\n### concurrency: {clients} clients x {requests} requests, max_tokens={max_tokens}")
    print(
        f"serial:  {serial_s:.2f} s for {n} requests ({n / serial_s:.2f} req/s, "
        f"mean latency {statistics.mean(v[1] for v in serial.values()):.2f} s)"
    )
    print(
        f"at once: {wall:.2f} s for {n} requests ({n / wall:.2f} req/s, mean latency "
        f"{statistics.mean(lat):.2f} s, max {max(lat):.2f} s); replies equal serial: {same}"
    )


def ttft_http(url, max_tokens: int, repeats: int):
    def idle():
        # A hung-up stream finishes its current canvas first; do not time that.
        while True:
            h = httpx.get(url + "/health").json()
            if not h["running"] and not h["queued"]:
                return
            time.sleep(0.05)

    def first(thinking: bool):
        idle()
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "seed": 1,
            "max_tokens": max_tokens,
            "stream": True,
            "reasoning_effort": "high" if thinking else "none",
        }
        tic = time.perf_counter()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content") or delta.get("reasoning_content"):
                        return time.perf_counter() - tic

    for thinking in (False, True):
        times = [first(thinking) for _ in range(repeats)]
        print(
            f"HTTP TTFT, thinking {'on ' if thinking else 'off'}: median "
            f"{statistics.median(times) * 1000:.0f} ms over {repeats} "
            f"(max_tokens={max_tokens}, whole reply {max_tokens // 8} canvases)"
        )


def ttft_forced(model_path: str, canvases_of_thought: int):
    from mlx_diffgemma import CanvasLayout, load, stream_generate
    from mlx_diffgemma.server.run import drive
    from mlx_diffgemma.server.textstream import TextStream

    model, tok = load(model_path)
    thought = " ".join(["step"] * (8 * canvases_of_thought))
    ids = tok.encode(f"<|channel>thought\n{thought}<channel|>The answer is 4.") + [106]
    layout = CanvasLayout(tuple(ids), (True,) * len(ids))
    for _ in range(2):  # the first run warms up
        tic, seen = time.perf_counter(), {}
        events = stream_generate(model, tok, "Hi", layout=layout, seed=0)
        for ev in drive(events, TextStream([], False), lambda: None, 0):
            seen.setdefault(ev.kind, time.perf_counter() - tic)
    print(
        f"forced thought of {len(tok.encode(thought))} tokens then the answer "
        f"({len(ids)} tokens, canvas 8): first reasoning delta {seen['reasoning'] * 1000:.0f} "
        f"ms, first answer delta {seen['content'] * 1000:.0f} ms"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    proc, url = start(args.model)
    try:
        transcript(url)
        concurrency(url, args.clients, args.requests, args.max_tokens)
        print("\n### time to first token")
        ttft_http(url, 64, 5)
    finally:
        proc.terminate()
        proc.wait()
    ttft_forced(args.model, 4)


if __name__ == "__main__":
    main()
