"""Start `python -m mlx_diffgemma.server` as a real process on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server on 127.0.0.1; `url`, `proc`, `log` (its output), `rss()` in bytes."""

    def __init__(self, checkpoint: Path, log: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "mlx_diffgemma.server", "--model", str(checkpoint)]
        cmd += ["--port", str(self.port), "--log-level", "WARNING", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.3)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def stop(self) -> bool:
        """Terminate it; whether it was still alive."""
        alive = self.proc.poll() is None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        return alive
