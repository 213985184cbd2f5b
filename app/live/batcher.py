"""One worker thread that runs jobs in micro-batches, with admission control.

Requests `admit()` a slot first (at most `capacity` jobs in progress, from
the moment a request is admitted until its result is read), so a flood of
uploads is answered `Busy` at once instead of piling up in memory; one client
may hold at most `share` of the slots (`ClientBusy` beyond), so a client that
holds its slots without finishing cannot shut out every other. Admitted
jobs are submitted through their slot to a queue; the worker takes the first
waiting job and every other job already queued (up to `max_batch`), waiting
up to `linger` seconds for admitted jobs that are still being read or decoded
(never when none are), and runs them together with `run_batch`, which returns
one result per job, in order. Results come back as
`concurrent.futures.Future`s, which the event loop awaits with
`asyncio.wrap_future`: inference never runs on the event loop.

The worker runs at a lower CPU priority (`nice`, Linux: per thread, inherited
by the compute threads it starts), so requests that only browse the index are
served promptly while inference uses every core.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")


class Busy(RuntimeError):
    """Too many jobs in progress; `retry_after` is a suggested wait in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"busy: retry in {retry_after} s")
        self.retry_after = retry_after


class ClientBusy(Busy):
    """This client already holds its share of the slots."""

    def __init__(self, retry_after: int, share: int):
        super().__init__(retry_after)
        self.share = share


class Slot:
    """An admitted job's place: `submit` hands its job to the worker (once)."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self.submitted = False

    def submit(self, job) -> Future:
        if not self.submitted:
            self.submitted = True
            self._batcher._arrived()
        return self._batcher.submit(job)


class MicroBatcher(Generic[Job, Result]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Job]], Sequence[Result]],
        max_batch: int,
        capacity: int,
        name: str = "clipscope-live",
        linger: float = 0.05,
        nice: int = 5,
    ):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.capacity = capacity
        self.linger = linger
        self.nice = nice
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_progress = 0
        self._coming = 0  # admitted jobs not submitted yet (being read or decoded)
        self._held: dict[Hashable, int] = {}  # slots in progress per client
        self._seconds_per_job = 1.0  # running estimate, for Retry-After
        self.batches = 0  # batches run (tests and benchmarks read it)
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet taken by the worker."""
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until the jobs in progress are likely done (at least 1)."""
        return max(1, math.ceil(self._in_progress * self._seconds_per_job))

    @contextmanager
    def admit(self, client: Hashable = None, share: int = 0) -> Iterator[Slot]:
        """Hold one of `capacity` slots for the duration of the block, or raise Busy; with `share` > 0, raise
        ClientBusy when `client` already holds `share` slots."""
        with self._lock:
            held = self._held.get(client, 0)
            if share and held >= share:
                raise ClientBusy(self.retry_after(), share)
            if self._in_progress >= self.capacity:
                raise Busy(self.retry_after())
            self._in_progress += 1
            self._coming += 1
            self._held[client] = held + 1
        slot = Slot(self)
        try:
            yield slot
        finally:
            with self._lock:
                self._in_progress -= 1
                if not slot.submitted:
                    self._coming -= 1
                self._held[client] -= 1
                if not self._held[client]:
                    del self._held[client]

    def _arrived(self) -> None:
        with self._lock:
            self._coming -= 1

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self._queue.put((job, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self) -> list | None:
        first = self._queue.get()
        if first is None:
            return None
        taken = [first]
        deadline = time.monotonic() + self.linger
        while len(taken) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if self._coming <= 0 or wait <= 0:
                    break
                try:  # more admitted uploads are on their way: let them join this batch
                    item = self._queue.get(timeout=min(wait, 0.005))
                except queue.Empty:
                    continue
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            taken.append(item)
        return taken

    def _lower_priority(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
        except (AttributeError, OSError) as error:  # not Linux, or not allowed: run at normal priority
            log.debug("live worker keeps its priority: %s", error)

    def _work(self) -> None:
        if self.nice:
            self._lower_priority()
        while True:
            taken = self._take()
            if taken is None:
                return
            live = [(job, future) for job, future in taken if future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = self._run_batch([job for job, _ in live])
            except Exception as error:  # every waiting request gets the error, the worker lives on
                log.exception("live encoding failed for a batch of %d", len(live))
                for _, future in live:
                    future.set_exception(error)
                continue
            elapsed = time.perf_counter() - started
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed / len(live)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(live))
            for (_, future), result in zip(live, results):
                future.set_result(result)
