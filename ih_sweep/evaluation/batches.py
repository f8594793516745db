"""Running a function over batches of work: one after the other, or several at once in
threads on CPU; on CUDA out-of-memory the batch size halves and the work goes on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def run_batches(fn, work: list, batch_size: int, desc: str, progress: bool,
                workers: int = 1, bar=None, weight=len, threads: int | None = None):
    """Apply fn to batches of work; on CUDA out-of-memory halve the batch and go on.
    With ``workers`` > 1 (CPU), that many batches run at once (see :func:`in_threads`).
    ``bar``: a progress bar to update (left open) instead of one of its own, by
    ``weight(batch)`` per batch done. ``threads``: torch's intra-op threads for each batch
    (None: as :func:`in_threads` splits them, or all of them one batch at a time)."""
    bs = max(1, batch_size)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(work), desc=desc, disable=not progress, leave=False)
    if workers > 1 and len(work) > bs:
        results = in_threads(fn, [work[i:i + bs] for i in range(0, len(work), bs)],
                             workers, bar, weight, threads)
        if own_bar:
            bar.close()
        return results
    if threads:
        with intra_op_threads(threads):
            results = _one_at_a_time(fn, work, bs, bar, weight)
    else:
        results = _one_at_a_time(fn, work, bs, bar, weight)
    if own_bar:
        bar.close()
    return results


def _one_at_a_time(fn, work: list, bs: int, bar, weight) -> list:
    """:func:`run_batches`' batches one after the other, halving on CUDA out-of-memory."""
    results = []
    start = 0
    while start < len(work):
        chunk = work[start:start + bs]
        try:
            results.append(fn(chunk))
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            bs = max(1, len(chunk) // 2)
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory: batch size halved to %d", bs)
            continue
        start += len(chunk)
        bar.update(weight(chunk))
    return results


def batch_threads(workers: int, n_work: int, batch_size: int) -> int:
    """torch's intra-op threads each batch of ``n_work`` runs on when
    :func:`run_batches` spreads them over ``workers``: the cores split among the batches
    that run at once, or all of them when one batch runs at a time. A function of the
    whole run only, so that every batch, the first one checked on its own included
    (:func:`check_first_batch`), computes with the same threads (sums over another number
    of threads round differently: a batch's floats would depend on whether it was the
    process's first)."""
    threads = torch.get_num_threads()
    batches = -(-n_work // max(1, batch_size))
    return max(1, threads // min(workers, batches)) if workers > 1 and batches > 1 else threads


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count while inside (threads started inside inherit it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_threads(fn, chunks: list, workers: int, bar, weight=len, threads: int | None = None
                ) -> list:
    """Batches in ``workers`` threads at once, the cores split between them.

    Why: on CPU the evaluator's operators are small (a 2-layer model, 16-dim heads) and
    parallelise poorly inside one batch (2 threads: ~1.2x one), while whole batches are
    independent: two at once on one thread each evaluate ~1.2x faster than one at a time
    on two (benchmarks/README.md). torch releases the GIL inside its operators."""
    workers = min(workers, len(chunks))
    per_worker = threads or max(1, torch.get_num_threads() // workers)

    def run(chunk):
        with torch.no_grad():  # grad mode is per thread
            return fn(chunk)

    with intra_op_threads(per_worker), ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, c): weight(c) for c in chunks}
        results = []
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(futures[future])
        except BaseException:  # a failed batch (or Ctrl-C): start no other
            for future in futures:
                future.cancel()
            raise
    return results
