"""Embed generation in an app: a worker thread owns the model; the app submits prompts
with a progress callback and may cancel them, while its own thread stays responsive.

MLX runs lazy arrays on the thread that made them, so the worker loads the model too.

    python examples/embed_in_app.py CHECKPOINT [TIMEOUT_SECONDS]
"""

import queue
import sys
import threading

from mlx_diffgemma import load, stream_generate


class Worker:
    """A background thread that loads a checkpoint, then answers prompts one at a time."""

    def __init__(self, path):
        self.jobs = queue.Queue()
        threading.Thread(target=self._run, args=(path,), daemon=True).start()

    def submit(self, prompt, on_progress, on_done):
        """Queue a prompt; returns an Event that cancels it once set."""
        cancel = threading.Event()
        self.jobs.put(([{"role": "user", "content": prompt}], on_progress, on_done, cancel))
        return cancel

    def _run(self, path):
        model, tokenizer = load(path)
        while True:
            messages, on_progress, on_done, cancel = self.jobs.get()
            stream = stream_generate(model, tokenizer, messages, drafts=True, seed=0)
            answer, last = [], None
            try:
                for last in stream:
                    if cancel.is_set():
                        break
                    answer.append(last.text)
                    on_progress(last)
            finally:
                stream.close()  # no further forward runs after this
            on_done("".join(answer), last.finish_reason or "cancelled")


if __name__ == "__main__":
    finished = threading.Event()

    def progress(r):
        print(f"{r.kind:6} canvas {r.block_index} step {r.step}", file=sys.stderr)

    def done(answer, reason):
        print(f"{answer}\n[{reason}]")
        finished.set()

    cancel = Worker(sys.argv[1]).submit("Name three primary colours.", progress, done)
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    if not finished.wait(timeout):  # e.g. the user pressed Stop
        cancel.set()
        finished.wait()
