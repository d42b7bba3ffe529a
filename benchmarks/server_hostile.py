"""Issue 19's memory and wedge requests against a server: peak memory and time to recovery.

Starts `python -m mlx_diffgemma.server --model MODEL` from `--repo` (this checkout by
default; point it at an older checkout to measure the "before") on a free loopback port,
then for each case sends the request, samples the server's RSS every 0.1 s until the reply
(or `--limit` seconds), and, for the wedge cases, hangs up after 2 s and times how long a
small request then takes to be served. A server that does not recover within the limit is
killed and restarted for the next case.

    python -m benchmarks.server_hostile --model PATH [--repo OLD_CHECKOUT]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "x-max-tokens": 10**9}}}
MEMORY = {
    "json_schema x-max-tokens 1e9": (
        CHAT,
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMA},
            },
        },
    ),
    "json_object max_tokens 1e9": (
        CHAT,
        {"messages": USER, "max_tokens": 10**9, "response_format": {"type": "json_object"}},
    ),
    "suffix max_tokens 1e9": (COMPLETIONS, {"prompt": "a", "suffix": "b", "max_tokens": 10**9}),
}
WEDGE = {
    "max_denoising_steps 1e9, hang up at 2 s": {"max_denoising_steps": 10**9},
    "max_denoising_steps 1000, hang up at 2 s": {"max_denoising_steps": 1000},
}


class Server:
    def __init__(self, model: str, repo: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mlx_diffgemma.server", "--model", model]
        cmd += ["--port", str(port), "--log-level", "ERROR"]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        self.proc = subprocess.Popen(cmd, env=env, cwd=repo, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                httpx.get(self.url + "/health", timeout=1)
                self.base = self.rss()
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("the server did not start")

    def rss(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
        return kb / 1e6

    def post(self, path, body, timeout):
        headers = {"content-type": "application/json"}
        return httpx.post(
            self.url + path, content=json.dumps(body), headers=headers, timeout=timeout
        )

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def memory_case(srv: Server, path, body, limit: float):
    """(status or 'none', seconds, peak RSS in GB)."""
    out = {}

    def send():
        try:
            out["status"] = srv.post(path, body, limit).status_code
        except httpx.HTTPError:
            out["status"] = "none"

    t = threading.Thread(target=send)
    tic, peak = time.perf_counter(), srv.rss()
    t.start()
    while t.is_alive() and time.perf_counter() - tic < limit:
        peak = max(peak, srv.rss())
        time.sleep(0.1)
    t.join(1)
    return out.get("status", "none"), time.perf_counter() - tic, peak


def recovery(srv: Server, extra: dict, limit: float):
    """Hang up a long request after 2 s; seconds until a small request is served."""
    body = {"messages": USER, "max_tokens": 400, **extra}
    try:
        status = srv.post(CHAT, body, 2).status_code
    except httpx.HTTPError:
        status = "hung up"
    tic = time.perf_counter()
    small = {"messages": USER, "max_tokens": 1, "max_denoising_steps": 1}
    while time.perf_counter() - tic < limit:
        try:
            if (
                srv.post(CHAT, small, max(1.0, limit - (time.perf_counter() - tic))).status_code
                == 200
            ):
                return status, time.perf_counter() - tic
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return status, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="A checkpoint folder (a tiny one will do).")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--limit", type=float, default=30.0, help="Seconds per case at most.")
    args = p.parse_args()
    srv = Server(args.model, Path(args.repo))
    print(f"repo {args.repo}; server RSS at rest {srv.base:.2f} GB\n")
    print("| case | status | seconds | peak RSS GB |\n|---|---|---|---|")
    for name, (path, body) in MEMORY.items():
        status, seconds, peak = memory_case(srv, path, body, args.limit)
        print(f"| {name} | {status} | {seconds:.1f} | {peak:.2f} |", flush=True)
        if status == "none":
            srv.kill()
            srv = Server(args.model, Path(args.repo))
    print("\n| wedge | first reply | next request served after (s) |\n|---|---|---|")
    for name, extra in WEDGE.items():
        status, seconds = recovery(srv, extra, args.limit)
        shown = f"{seconds:.2f}" if seconds is not None else f"not within {args.limit:g}"
        print(f"| {name} | {status} | {shown} |", flush=True)
        if seconds is None:
            srv.kill()
            srv = Server(args.model, Path(args.repo))
    srv.kill()


if __name__ == "__main__":
    main()
