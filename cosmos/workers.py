"""Worker process pools that stop cleanly: Ctrl-C and SIGTERM reach the parent only, which stops the pool at once.

Pool workers ignore SIGINT and keep SIGTERM's default action (for `terminate()`): a Ctrl-C in the terminal
(sent to the whole process group) would otherwise raise KeyboardInterrupt in every worker, print a traceback per
worker and can leave a worker dead in the middle of handing back a result, which is how joining the pool's result
handler could hang. The parent gets the interrupt, terminates the pool and re-raises.
"""
from __future__ import annotations

import multiprocessing
import signal
from typing import Callable, Iterable, Iterator


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # terminate() ends a worker silently (a forked worker would
    # otherwise inherit the CLI's SIGTERM handler and print a KeyboardInterrupt traceback)


def imap_in_pool(func: Callable, items: Iterable, workers: int, chunksize: int = 1,
                 start_method: str | None = None) -> Iterator:
    """pool.imap(func, items) in `workers` processes, results in order; the pool is terminated (not joined on
    pending work) if the consumer stops early, fails or is interrupted."""
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(workers, initializer=_quiet_worker)
    finished = False
    try:
        yield from pool.imap(func, items, chunksize=chunksize)
        finished = True
    finally:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()
