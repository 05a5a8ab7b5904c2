"""The decode stage: read and preprocess files in worker processes while the model runs.

Work goes out in chunks of a few files (small files would otherwise cost more in messaging than
in decoding) with a bounded number of chunks in flight, so memory stays flat however large the
archive. Results come back in submission order; native slices (the model's device maps them)
through shared memory (handoff.py). `workers=0` decodes inline, for tiny jobs and tests
(a PACS's instances and a bucket's objects fetched ahead in a few threads: their time is the network's).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Callable, Iterable, Iterator, TypeVar

from embedstore.errors import DECODE_ERROR, DUPLICATE_INSTANCE, WORKER_CRASHED, InputError, SourceUnavailableError
from embedstore.pipeline.handoff import adopt_chunk, handoff_directory, remove_directory, share_chunk
from embedstore.preprocess import DecodedFile, DecodeSettings, decode_task
from embedstore.sources.codec_output import CodecOutput, captured_output, with_output
from embedstore.sources.dicom import parse_dicom
from embedstore.sources.native import FETCHES, fetch, is_remote, readable
from embedstore.sources.records import Failure, ReadTask

T = TypeVar("T")

CHUNK_SLICES = 8  # files are grouped until a chunk holds this many slices
CHUNKS_IN_FLIGHT_PER_WORKER = 4
REMOTE_CHUNKS_AHEAD = 4  # inline decoding of a PACS or a bucket: chunks fetched ahead, in threads
REMOTE_FETCHES = 8  # fetches at once


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes; one thread each avoids oversubscription


def decode_or_fail(task: ReadTask, settings: DecodeSettings) -> DecodedFile | list[Failure]:
    """The decoded task, or the failures that stopped it. A DICOM instance with alternate copies is
    read from the first copy that decodes; the others are recorded as failures of their own
    (what was wrong with them) or as duplicates of the copy that was used. What the readers and
    codecs print is caught per copy: into a failure's message, or the decoded file's codec_output."""
    failures = []
    copies = [task.path, *task.alternates]
    for position, path in enumerate(copies):
        decoded, output = _attempt(partial(decode_task, task if path == task.path else task.at(path), settings), path)
        if isinstance(decoded, Failure):
            failures.append(decoded)
            continue
        decoded.codec_output = output.lines
        sop_uid = task.items[0].sop_uid
        decoded.failures = failures + [_unused_copy(other, sop_uid, path) for other in copies[position + 1:]]
        return decoded
    return failures


def _attempt(read: Callable[[], T], path: str) -> tuple[T | Failure, CodecOutput]:
    """What `read` returns, or the Failure it raised (its message with the codec output), and
    what the readers and codecs printed meanwhile: kept off the terminal."""
    with captured_output() as output:
        try:
            result = read()
        except InputError as error:
            result = Failure(path, error.stage, error.reason, error.message)
        except SourceUnavailableError:  # no fault of this file's: the run stops
            raise
        except Exception as error:  # a reader bug or an odd file must not end the run
            result = Failure(path, "decode", DECODE_ERROR, f"{type(error).__name__}: {error}")
    if isinstance(result, Failure):
        result.message = with_output(result.message, output)
    return result, output


def _unused_copy(path: str, sop_uid: str, used: str) -> Failure:
    """A copy of an instance that was embedded from another file: a duplicate if it parses, else
    what is wrong with it (a copy cut short is `truncated`, never a duplicate)."""
    parsed, _ = _attempt(partial(_parse_copy, path), path)
    return parsed if isinstance(parsed, Failure) else \
        Failure(path, "read", DUPLICATE_INSTANCE, f"SOP instance {sop_uid} is embedded from {used}")


def _parse_copy(path: str) -> None:
    with readable(path) as local:  # a copy in a PACS or a bucket is fetched to be parsed
        parse_dicom(local)


def decode_chunk(tasks: list[ReadTask], settings: DecodeSettings, handoff: str | None = None) -> list:
    """The chunk's results; with a `handoff` directory (a worker process), decoded values travel there."""
    results = [decode_or_fail(task, settings) for task in tasks]
    if handoff is not None:
        share_chunk(results, handoff)
    return results


def chunk_tasks(tasks: Iterable[ReadTask], chunk_slices: int = CHUNK_SLICES) -> Iterator[list[ReadTask]]:
    chunk: list[ReadTask] = []
    size = 0
    for task in tasks:
        chunk.append(task)
        size += len(task.items)
        if size >= chunk_slices:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class DecodePool:
    def __init__(self, workers: int, settings: DecodeSettings):
        self.workers = workers
        self.settings = settings
        self.stage_seconds: Counter = Counter()  # read_decode and preprocess, summed over workers
        self._executor: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None  # inline retrievals of remote sources
        # Workers hand native slices (settings.on_device) back through shared memory (handoff.py);
        # mapped slices are few bytes after the resize and take the pipe.
        self._handoff: str | None = None

    def __enter__(self) -> "DecodePool":
        if self.workers and self.settings.on_device:
            self._handoff = handoff_directory()
        if self.workers:
            # Start every worker now (spawn start-up is seconds: torch import) so it overlaps the
            # catalog and planning instead of delaying the first batch.
            for _ in range(self.workers):
                self._pool().submit(_init_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
            for path, ahead in list(FETCHES.items()):  # fetched for a run that stopped: not to be read
                del FETCHES[path]
                if not ahead.cancelled() and ahead.exception() is None:
                    os.unlink(ahead.result())
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._handoff is not None:
            remove_directory(self._handoff)
            self._handoff = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )
        return self._executor

    def decode(self, tasks: Iterable[ReadTask]) -> Iterator[tuple[ReadTask, DecodedFile | list[Failure]]]:
        chunks = chunk_tasks(tasks)
        if self.workers == 0:
            yield from self._decode_here(chunks)
            return
        in_flight: deque[tuple[list[ReadTask], Future]] = deque()
        limit = self.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        for chunk in chunks:
            in_flight.append((chunk, self._submit(chunk)))
            if len(in_flight) >= limit:
                yield from self._collect(*in_flight.popleft())
        while in_flight:
            yield from self._collect(*in_flight.popleft())

    def _decode_here(self, chunks: Iterable[list[ReadTask]]) -> Iterator[tuple[ReadTask, DecodedFile | list[Failure]]]:
        """Inline decoding, chunk by chunk. A PACS's instances and a bucket's objects (their time is
        the network's) are fetched ahead in threads, REMOTE_CHUNKS_AHEAD chunks ahead; decoding stays
        in this thread (the codecs' output is caught by redirecting this process's descriptors)."""
        waiting: deque[list[ReadTask]] = deque()
        for chunk in chunks:
            remote = is_remote(chunk[0].path)
            if remote:
                self._fetch_ahead(chunk)
            waiting.append(chunk)
            # fetched chunks wait while the next ones are fetched; a file's chunk is decoded at once
            while len(waiting) > (REMOTE_CHUNKS_AHEAD - 1 if remote else 0):
                yield from self._decode_inline(waiting.popleft())
        while waiting:
            yield from self._decode_inline(waiting.popleft())

    def _fetch_ahead(self, chunk: list[ReadTask]) -> None:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(REMOTE_FETCHES, thread_name_prefix="fetch")
        for task in chunk:
            FETCHES[task.path] = self._threads.submit(fetch, task.path)

    def _decode_inline(self, chunk: list[ReadTask]) -> Iterator[tuple[ReadTask, DecodedFile | list[Failure]]]:
        results = decode_chunk(chunk, self.settings)
        self._received(results)
        return zip(chunk, results)

    def _submit(self, chunk: list[ReadTask]) -> Future:
        try:
            return self._pool().submit(decode_chunk, chunk, self.settings, self._handoff)
        except BrokenProcessPool:
            self._replace_pool()
            return self._pool().submit(decode_chunk, chunk, self.settings, self._handoff)

    def _replace_pool(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _collect(self, chunk: list[ReadTask], future: Future) -> Iterator[tuple[ReadTask, DecodedFile | list[Failure]]]:
        try:
            results = future.result()
        except BrokenProcessPool:
            # A worker died (a codec crash, the OOM killer) and took the pool's queued work with it.
            # Retry this chunk's files one by one in a fresh pool: only the culprit becomes a failure.
            self._replace_pool()
            return ((task, self._decode_alone(task)) for task in chunk)
        self._received(results)
        return zip(chunk, results)

    def _decode_alone(self, task: ReadTask) -> DecodedFile | list[Failure]:
        try:
            (result,) = self._submit([task]).result()
        except BrokenProcessPool as error:
            self._replace_pool()
            return [Failure(task.path, "decode", WORKER_CRASHED, f"decode worker died reading this file: {error}")]
        self._received([result])
        return result

    def _received(self, results: list) -> None:
        """Results back: their values taken from shared memory, their stage seconds counted."""
        adopt_chunk(results)
        for result in results:
            if isinstance(result, DecodedFile):
                self.stage_seconds.update(result.seconds)
