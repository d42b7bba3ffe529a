"""One model, one worker thread: a bounded queue of jobs, run one at a time.

A job hands its events to the event loop of the HTTP request that made it. Every job can
be stopped within one denoising step: its client hanging up (`Worker.cancel`), its
deadline passing (`--request-timeout`) or the server shutting down all end the work at
the next step (`stream_generate(should_stop=...)`), and a job that has not started yet
leaves the queue at once, so its slot is free for the next client.
"""

import asyncio
import collections
import logging
import threading
import time
from typing import Optional

from ..generate import Cancelled
from .protocol import RequestError
from .run import CacheStore, GenerationError, run

log = logging.getLogger("mlx_diffgemma.server")

STUCK_GRACE_S = 30.0  # past its deadline by this much, a running job makes the worker "stuck"


class QueueFull(Exception):
    """No room for another job (HTTP 503 with Retry-After)."""


class Stopped(RuntimeError):
    """A job ended by its deadline or by shutdown; `status` is the HTTP status to report."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _shutting_down() -> "Stopped":
    return Stopped("The server is shutting down; retry later.", 503)


class Job:
    """A request on its way through the worker; `out` receives `(kind, payload)` items.

    Kinds: "event" (a `run.Event`), "error" (an exception; nothing follows but "end"),
    "end".

    Args:
        req: the parsed request.
        loop: the event loop of the HTTP request that waits for the events.
        timeout: seconds from now after which the work stops; 0 or None for no deadline.
    """

    def __init__(self, req, loop: asyncio.AbstractEventLoop, timeout: Optional[float] = None):
        self.req = req
        self.loop = loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # the client is gone
        self.created = time.monotonic()
        self.deadline = self.created + timeout if timeout else None
        self.finished = False  # the worker sent its last event

    def send(self, kind: str, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()

    def overdue(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline


class Worker:
    """Runs jobs on the model in submission order.

    Args:
        model, tokenizer: the loaded model.
        queue_size: jobs that may wait besides the running one; more are refused.
        cache_size: prompt caches kept for reuse across requests.
    """

    def __init__(self, model, tokenizer, queue_size: int = 8, cache_size: int = 4):
        self.model, self.tokenizer = model, tokenizer
        self.queue_size = queue_size
        self.waiting: collections.deque = collections.deque()
        self.lock = threading.Condition()
        self.caches = CacheStore(model, cache_size)
        self.current: Optional[Job] = None
        self.closing = False
        self.counts = {"served": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self.thread = threading.Thread(target=self._loop, name="mlx-diffgemma-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        """Queue a job; raises `QueueFull` when the queue is full or the server is closing."""
        with self.lock:
            if self.closing or len(self.waiting) >= self.queue_size:
                raise QueueFull
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job):
        """The job's client is gone: drop it from the queue, or stop it at the next step."""
        job.cancelled.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1
                job.send("end")

    def stats(self) -> dict:
        """The worker as `/health` reports it: idle, busy (with the request's age) or stuck
        (a request still running well past its deadline)."""
        with self.lock:
            job, queued = self.current, len(self.waiting)
        now = time.monotonic()
        state = "idle" if job is None else "busy"
        age = None if job is None else round(now - job.created, 3)
        if job is not None and job.deadline is not None and now > job.deadline + STUCK_GRACE_S:
            state = "stuck"
        return {
            "worker": state,
            "running": job is not None,
            "running_for_s": age,
            "queued": queued,
            **self.counts,
        }

    def _next(self) -> Optional[Job]:
        with self.lock:
            while not self.waiting and not self.closing:
                self.lock.wait()
            if not self.waiting:
                return None
            self.current = self.waiting.popleft()
            return self.current

    def _loop(self):
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self.lock:
                    self.current = None
                job.finished = True
                job.send("end")

    def _should_stop(self, job: Job):
        return lambda: self.closing or job.cancelled.is_set() or job.overdue()

    def _run(self, job: Job):
        tic = time.perf_counter()
        events, outcome = None, "served"
        try:
            if job.overdue():
                raise Cancelled("the deadline passed in the queue")
            events = run(self.model, self.tokenizer, job.req, self.caches, self._should_stop(job))
            for ev in events:
                if job.cancelled.is_set():
                    raise Cancelled("client gone")
                job.send("event", ev)
        except Cancelled:
            outcome = self._stopped(job)
        except (RequestError, GenerationError) as e:
            outcome = "failed"
            job.send("error", e)
        except Exception as e:  # a bug must not take the worker down: report and go on
            log.exception("generation failed")
            outcome = "failed"
            job.send("error", e)
        finally:
            if events is not None:
                events.close()
        self.counts[outcome] += 1
        if outcome != "served":
            log.info("%s after %.2f s", outcome, time.perf_counter() - tic)

    def _stopped(self, job: Job) -> str:
        """Tell a stopped job's client why (if it is still there); the outcome to count."""
        if job.cancelled.is_set():
            return "cancelled"
        if self.closing:
            job.send("error", _shutting_down())
            return "cancelled"
        job.send(
            "error",
            Stopped("The request ran past the server's --request-timeout and was stopped.", 504),
        )
        return "timed_out"

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking jobs, stop the running one at its next step, refuse the queued ones;
        wait up to `timeout` seconds for the thread. Returns whether it ended."""
        with self.lock:
            self.closing = True
            dropped = list(self.waiting)
            self.waiting.clear()
            self.lock.notify_all()
        for job in dropped:
            job.send("error", _shutting_down())
            job.send("end")
        if timeout is not None:
            self.thread.join(timeout)
        return not self.thread.is_alive()
