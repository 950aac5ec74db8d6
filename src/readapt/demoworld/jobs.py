"""Two cores: independent jobs in two single-threaded worker processes."""

from __future__ import annotations

import torch

def _single_thread() -> None:
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()  # no "Loading weights" bars from the workers


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Jobs:
    """Run independent jobs on `workers` single-threaded processes (tiny models use one core far better
    than two threads share it); with one worker, jobs run in this process as they are submitted."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_single_thread)

    def submit(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs) if self.pool else _Done(fn(*args, **kwargs))

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

