"""One model, one worker thread: a bounded queue of jobs, run one at a time.

A job hands its events to the event loop of the HTTP request that made it. A request
whose client went away sets `cancelled`: the worker stops iterating that job's
generator (no further forward pass runs) or skips the job if it has not started.
"""

import asyncio
import logging
import queue
import threading
import time

from .protocol import RequestError
from .run import CacheStore, GenerationError, run

log = logging.getLogger("mlx_diffgemma.server")


class Job:
    """A request on its way through the worker; `out` receives `(kind, payload)` items.

    Kinds: "event" (a `run.Event`), "error" (an exception; nothing follows but "end"),
    "end".
    """

    def __init__(self, req, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.loop = loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, kind: str, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()


class Worker:
    """Runs jobs on the model in submission order.

    Args:
        model, tokenizer: the loaded model.
        queue_size: jobs that may wait besides the running one; more are refused.
        cache_size: prompt caches kept for reuse across requests.
    """

    def __init__(self, model, tokenizer, queue_size: int = 8, cache_size: int = 4):
        self.model, self.tokenizer = model, tokenizer
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.caches = CacheStore(model, cache_size)
        self.running = False
        self.served = 0
        self.cancelled = 0
        self.thread = threading.Thread(target=self._loop, name="mlx-diffgemma-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        """Queue a job; raises `queue.Full` when the queue is full."""
        self.jobs.put_nowait(job)

    def stats(self) -> dict:
        return {
            "queued": self.jobs.qsize(),
            "running": self.running,
            "served": self.served,
            "cancelled": self.cancelled,
        }

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                job.send("end")
                continue
            self.running = True
            try:
                self._run(job)
            finally:
                self.running = False
                job.send("end")

    def _run(self, job: Job):
        tic = time.perf_counter()
        events = None
        try:
            events = run(self.model, self.tokenizer, job.req, self.caches)
            for ev in events:
                if job.cancelled.is_set():
                    break
                job.send("event", ev)
        except (RequestError, GenerationError) as e:
            job.send("error", e)
        except Exception as e:  # a bug must not take the worker down: report and go on
            log.exception("generation failed")
            job.send("error", e)
        finally:
            if events is not None:
                events.close()
        if job.cancelled.is_set():
            self.cancelled += 1
            log.info("cancelled after %.2f s (client gone)", time.perf_counter() - tic)
        else:
            self.served += 1

    def close(self):
        self.jobs.put(None)
