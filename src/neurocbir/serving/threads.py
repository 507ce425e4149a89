"""How a query uses the threads of the serving process: one OpenMP thread for the calling thread
while it answers (:func:`one_thread`), numpy's BLAS on one thread (:func:`one_blas_thread`), and a
pool for work beside the CNN or waiting on a server (:func:`side_work`)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController


@functools.cache
def _threads() -> ThreadpoolController:
    return ThreadpoolController()


@functools.cache
def side_work() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-search")


def one_thread(fn):
    """``fn`` with the calling thread's OpenMP parallel regions (FAISS's searches, PyTorch's pre- and
    post-processing) on one thread while it runs. Per thread: other requests and a background reload
    keep theirs. On 2 cores a query's small parallel regions waited more than they gained
    (docs/results.md, "The query's parts at scale", benchmarks/query_stages.py). The CNN itself
    runs in OpenVINO's own thread pool, which this does not touch."""

    @functools.wraps(fn)
    def on_one_thread(*args, **kwargs):
        with _threads().limit(limits=1, user_api="openmp"):
            return fn(*args, **kwargs)

    return on_one_thread


@functools.cache
def one_blas_thread() -> None:
    """numpy's and scipy's OpenBLAS (their wheels' ``libscipy_openblas``) on one thread from now on,
    in this process (OpenBLAS's count is per process, not per thread). A query's products are small
    (the duplicate check's windows and prints, run beside the CNN); OpenBLAS's threads spun on the
    cores the CNN needed: in process over the demo archive, query p50 1.56-1.64x the app's with them
    (docs/results.md, "The query's parts at scale", benchmarks/query_stages.py). FAISS's own
    OpenBLAS keeps its threads: it trains a large archive's inverted file when a view loads (with it
    on one thread too, `neurocbir serve` over 100,000 cases on Milvus took 77 s instead of 20 s to
    answer its first query). Called when a query service is made: a process that serves."""
    _threads().select(prefix="libscipy_openblas").limit(limits=1)  # kept: the limiter is not undone
