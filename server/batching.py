"""Triton-style dynamic batching: requests for one model share a `session.run`.

Each request's tensor waits in a queue on the event loop. A batch is dispatched when
`max_batch_size` requests are queued, or when the oldest has waited `max_queue_delay_us`; it is
stacked and run on the server's executor (never on the loop), and each row of the result goes back
to the request it came from. At most `max_in_flight` batches run at once (one per executor thread):
while they run, the next batch fills up, so under load batches form even with a delay of 0, and at
low load a lone request is not held back.

Batching changes nothing in the answers: a row's probabilities are the same bits whatever else is
in its batch. onnxruntime's CPU Conv runs image by image, and its Gemm pre-packs constant weights
and then uses one kernel for every batch size; the model loader refuses to batch a model for which
a trial batch differs (server/model.py `_check_batchable`), and tests/test_batching.py checks the
bundled model and the benchmark CNN. The max_queue_delay timer has the event loop's resolution:
epoll waits in whole milliseconds, so delays below 1 ms act as about 1 ms once no request arrives.
The batcher is not thread-safe: every method runs on the event loop that first called `submit`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from aigis.server.errors import InvalidArgument, ResourceExhausted, ServiceError
from aigis.server.model import BatchingConfig, OnnxClassifier

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


class BatcherClosed(ServiceError):
    """The batcher was closed (the server is stopping) before this request ran."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters since the batcher started; `sizes` maps batch size to how many batches had it."""

    batches: int
    requests: int
    failed_batches: int
    rejected: int  # refused because the queue was full
    cancelled: int  # callers that went away before their batch ran
    queued: int  # waiting now
    in_flight: int  # batches running now
    sizes: dict[int, int] = field(default_factory=dict)


class _Pending:
    __slots__ = ("deadline", "future", "row", "size")

    def __init__(self, row: Any, future: asyncio.Future[Any], deadline: float, size: int = 1) -> None:
        self.row = row
        self.future = future
        self.deadline = deadline  # loop.time() by which this request's batch should be dispatched
        self.size = size  # rows this request adds to a batch (its first dimension)


def executor_workers(executor: Executor) -> int:
    """How many threads `executor` runs at once (ThreadPoolExecutor keeps it private); 1 if unknown."""
    workers = getattr(executor, "_max_workers", None)
    return workers if isinstance(workers, int) and workers > 0 else 1


class DynamicBatcher:
    """One model's queue: `await submit(row)` returns that row's output, computed in a batch."""

    def __init__(self, predict: Predict, config: BatchingConfig, executor: Executor, *,
                 row_shape: tuple[int, ...], max_in_flight: int = 1, name: str = "") -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._predict = predict
        self._config = config
        self._executor = executor
        self._row_shape = tuple(row_shape)
        self._max_in_flight = max_in_flight
        self.name = name
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0  # sum of the queued entries' sizes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = 0
        self._closed = False
        self._batches = self._requests = self._failed = self._rejected = self._cancelled = 0
        self._sizes: collections.Counter[int] = collections.Counter()
        # Told the size of every batch dispatched (the server points it at a metrics histogram).
        self.on_batch: Callable[[int], None] | None = None

    @classmethod
    def for_model(cls, model: OnnxClassifier, executor: Executor, *, max_in_flight: int | None = None
                  ) -> DynamicBatcher:
        """A batcher for `model` per its `[batching]` settings; one batch per executor thread."""
        return cls(model.predict, model.config.batching, executor,
                   row_shape=model.config.input_shape(1)[1:],
                   max_in_flight=max_in_flight or executor_workers(executor), name=model.name)

    @property
    def config(self) -> BatchingConfig:
        return self._config

    def stats(self) -> BatchStats:
        return BatchStats(
            batches=self._batches, requests=self._requests, failed_batches=self._failed,
            rejected=self._rejected, cancelled=self._cancelled, queued=len(self._queue),
            in_flight=self._in_flight, sizes=dict(sorted(self._sizes.items())),
        )

    async def submit(self, row: np.ndarray) -> np.ndarray:
        """The model's output row for input `row` (one image, no batch dimension).

        Raises ResourceExhausted when the queue is full, BatcherClosed after `close`, and whatever
        the model raised for the batch this row ran in.
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(f"batcher {self.name!r} belongs to another event loop")
        if self._closed:
            raise BatcherClosed(_closed_message(self.name))
        # Checked here, not in the batch: one bad row must not fail its batch-mates.
        size = self._check(row)
        if len(self._queue) >= self._config.max_queue_size:
            self._rejected += 1
            raise ResourceExhausted(f"model {self.name!r} is overloaded: {len(self._queue)} requests are "
                                    f"already waiting; retry later")
        future: asyncio.Future[Any] = loop.create_future()
        entry = _Pending(row, future, loop.time() + self._config.max_queue_delay, size)
        self._queue.append(entry)
        self._queued_rows += size
        self._schedule()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: if its row is still queued, it does not take a place in a batch.
            try:
                self._queue.remove(entry)
            except ValueError:
                pass  # already dispatched; its result is dropped when the batch finishes
            else:
                self._queued_rows -= entry.size
                self._cancelled += 1
                self._schedule()
            raise

    def _check(self, row: Any) -> int:
        """Refuse a row that cannot join a batch; return how many batch rows it adds."""
        if row.dtype != np.float32 or row.shape != self._row_shape:
            raise ValueError(f"row must be float32 shaped {self._row_shape}, got {row.dtype} {row.shape}")
        return 1

    def close(self) -> None:
        """Refuse new requests and fail the queued ones with BatcherClosed (UNAVAILABLE).

        Batches already running finish and deliver their results. Call on the batcher's loop.
        """
        self._closed = True
        self._cancel_timer()
        while self._queue:
            entry = self._queue.popleft()
            self._queued_rows -= entry.size
            if not entry.future.done():
                entry.future.set_exception(BatcherClosed(_closed_message(self.name)))

    # --- on the loop --------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Dispatch every batch that is due and a slot allows; then wait for the next deadline."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while self._queue and self._in_flight < self._max_in_flight:
            if self._queued_rows < self._config.max_batch_size and self._queue[0].deadline > now:
                break
            self._dispatch()
        if self._queue and self._in_flight < self._max_in_flight:
            deadline = self._queue[0].deadline
            if self._timer is None or self._timer.when() != deadline:
                self._cancel_timer()
                self._timer = loop.call_at(deadline, self._on_timer)
        else:
            # Nothing queued, or every slot busy: a finishing batch calls _schedule again.
            self._cancel_timer()

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self) -> None:
        assert self._loop is not None
        entries: list[_Pending] = []
        rows = 0
        limit = self._config.max_batch_size
        # Whole requests only, at most max_batch_size rows (a request is never larger; see _check).
        while self._queue and rows + self._queue[0].size <= limit:
            entry = self._queue.popleft()
            self._queued_rows -= entry.size
            if entry.future.done():  # cancelled, and its task has not run yet to take it out
                self._cancelled += 1
            else:
                entries.append(entry)
                rows += entry.size
        if not entries:
            return
        if self.on_batch is not None:
            self.on_batch(rows)
        self._in_flight += 1
        try:
            running = self._loop.run_in_executor(self._executor, self._run_batch, [e.row for e in entries])
        except Exception as exc:  # the executor is shut down: fail this batch, not the loop
            self._in_flight -= 1
            self._settle(entries, exc, None)
            return
        running.add_done_callback(functools.partial(self._finished, entries))

    def _finished(self, entries: list[_Pending], running: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if running.cancelled():  # the executor dropped the work item (shutdown with cancel_futures)
            self._settle(entries, BatcherClosed(_closed_message(self.name)), None)
        elif (exc := running.exception()) is not None:
            self._settle(entries, exc, None)
        else:
            self._settle(entries, None, running.result())
        if not self._closed:
            self._schedule()

    def _settle(self, entries: list[_Pending], exc: BaseException | None, out: Any) -> None:
        self._batches += 1
        self._requests += len(entries)
        self._sizes[sum(e.size for e in entries)] += 1
        if exc is not None:
            self._failed += 1
            log.debug("batch of %d for model %r failed: %r", len(entries), self.name, exc)
        for i, entry in enumerate(entries):
            if entry.future.done():  # cancelled while its batch ran
                continue
            if exc is not None:
                entry.future.set_exception(exc)
            else:
                assert out is not None
                entry.future.set_result(out[i])

    # --- on an executor thread ----------------------------------------------------------------

    def _run_batch(self, rows: list[Any]) -> Any:
        """The batch's result, indexable by entry: `result[i]` goes back to the i-th request."""
        out = self._predict(np.stack(rows))
        if out.shape[0] != len(rows):
            raise RuntimeError(f"model {self.name!r} returned {out.shape[0]} rows for a batch of {len(rows)}")
        return out


Tensors = dict[str, np.ndarray]


class TensorBatcher(DynamicBatcher):
    """Dynamic batching for ModelInfer: whole requests (dicts of tensors sharing a first dimension of
    1..max_batch_size) are concatenated along that dimension, run once, and split back.

    The model's loader has checked that a row's outputs do not depend on its batch-mates
    (server/repository.py `OnnxModel.check`), so answers are the same bits as unbatched.
    """

    def __init__(self, run: Callable[[Tensors], Tensors], config: BatchingConfig, executor: Executor, *,
                 max_in_flight: int = 1, name: str = "") -> None:
        super().__init__(lambda batch: batch, config, executor, row_shape=(), max_in_flight=max_in_flight,
                         name=name)
        self._run = run

    def _check(self, row: Any) -> int:
        sizes = {a.shape[0] if a.ndim else 0 for a in row.values()}
        size = sizes.pop() if len(sizes) == 1 else 0
        if not 1 <= size <= self._config.max_batch_size:
            raise InvalidArgument(f"model {self.name!r} batches on the first dimension: every input needs the "
                                  f"same first dimension, from 1 to {self._config.max_batch_size}")
        return size

    def _run_batch(self, rows: list[Any]) -> Any:
        sizes = [next(iter(r.values())).shape[0] for r in rows]
        batch = rows[0] if len(rows) == 1 else {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        out = self._run(batch)
        total = sum(sizes)
        for name, array in out.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise RuntimeError(f"model {self.name!r} output {name!r} has not {total} rows for a batch of {total}")
        if len(rows) == 1:
            return [out]
        bounds = np.cumsum(sizes)[:-1]
        split = {k: np.split(v, bounds) for k, v in out.items()}
        return [{k: parts[i] for k, parts in split.items()} for i in range(len(rows))]


def _closed_message(name: str) -> str:
    return f"model {name!r} is not accepting requests: the server is shutting down; retry"
