"""The demo's jobs: a small dependency graph run on single-threaded worker processes, with one overall bar.

Each job builds one thing (a model, an adapter, an evaluation); a job starts when the jobs it needs are done,
so the two cores stay busy across seeds. Each job has an estimated cost in seconds; it reports the share it has
done with `tick` (training loops every step), and whatever it did not report counts when it finishes. The bar (tqdm, off when stderr is not a terminal) shows the
work done, the jobs running and an ETA.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_QUEUE = None  # in a worker: where `tick` sends progress
_CURRENT = ""  # the job running in this process
_BAR = None  # in the main process: the bar `tick` updates directly


def _worker_init(queue) -> None:
    from transformers.utils import logging

    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(1)
    logging.disable_progress_bar()  # no "Loading weights" bars from the workers


def tick(fraction: float) -> None:
    """Report that `fraction` (0..1) more of the job running here (a worker or the main process) is done."""
    if _QUEUE is not None:
        _QUEUE.put((_CURRENT, fraction))
    elif _BAR is not None:
        _BAR.update(_CURRENT, fraction * _BAR.costs.get(_CURRENT, 0.0))


def _invoke(name: str, fn: Callable, args: tuple, kwargs: dict):
    global _CURRENT
    _CURRENT = name
    try:
        return fn(*args, **kwargs)
    finally:
        _CURRENT = ""


@dataclass
class Job:
    """`fn(*args)` once the jobs named in `needs` are done; `cost` estimated seconds (progress and ETA).
    `fn` reports progress with `tick` as it goes; whatever it did not report is added when it finishes."""

    name: str
    fn: Callable
    args: tuple = ()
    needs: tuple[str, ...] = ()
    cost: float = 1.0
    inputs: tuple[str, ...] = field(default=())  # jobs whose results are passed after `args`
    kwargs: dict = field(default_factory=dict)


def run_jobs(jobs: list[Job], workers: int, desc: str = "demo") -> dict[str, object]:
    """Run `jobs` (any order given; each runs after its `needs`) on `workers` processes -> {name: result}.

    With one worker every job runs in this process, in dependency order."""
    names = {j.name for j in jobs}
    if len(names) < len(jobs):
        raise ValueError(f"job names repeat: {sorted(n for n in names if [j.name for j in jobs].count(n) > 1)}")
    for j in jobs:
        missing = set(j.needs) | set(j.inputs)
        if not missing <= names:
            raise ValueError(f"job {j.name} needs unknown jobs {sorted(missing - names)}")
    with _Bar(sum(j.cost for j in jobs), desc) as bar:
        if workers <= 1:
            return _run_here(jobs, bar)
        return _run_pool(jobs, workers, bar)


def _ready(pending: list[Job], done: dict) -> list[Job]:
    return [j for j in pending if all(n in done for n in (*j.needs, *j.inputs))]


def _args(job: Job, done: dict) -> tuple:
    return (*job.args, *(done[n] for n in job.inputs))


def _run_here(jobs: list[Job], bar: _Bar) -> dict:
    pending, done = list(jobs), {}
    while pending:
        ready = _ready(pending, done)
        if not ready:
            raise ValueError(f"jobs wait on each other: {[j.name for j in pending]}")
        job = ready[0]
        pending.remove(job)
        bar.start(job)
        done[job.name] = _invoke(job.name, job.fn, _args(job, done), job.kwargs)
        bar.finish(job)
    return done


def _run_pool(jobs: list[Job], workers: int, bar: _Bar) -> dict:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    pending, done, running = list(jobs), {}, {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(queue,)) as pool:
        try:
            while pending or running:
                for job in _ready(pending, done)[: workers - len(running)]:  # in the order given
                    pending.remove(job)
                    running[pool.submit(_invoke, job.name, job.fn, _args(job, done), job.kwargs)] = job
                    bar.start(job)
                if not running:
                    raise ValueError(f"jobs wait on each other: {[j.name for j in pending]}")
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                bar.drain(queue)
                for future in finished:
                    job = running.pop(future)
                    done[job.name] = future.result()
                    bar.finish(job)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    bar.drain(queue)
    return done


class _Bar:
    """One tqdm bar over estimated seconds of work; the postfix names the jobs running. A job's reports are
    capped at its estimate, and whatever it did not report is counted when it finishes."""

    def __init__(self, total: float, desc: str):
        self.total, self.desc, self.running, self.reported, self.costs = total, desc, [], {}, {}

    def __enter__(self):
        from tqdm.auto import tqdm

        global _BAR
        self.bar = tqdm(total=round(self.total, 1), desc=self.desc, unit="s", disable=None, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}", file=sys.stderr)
        _BAR = self
        return self

    def __exit__(self, *exc):
        global _BAR
        _BAR = None
        self.bar.close()

    def update(self, name: str, units: float) -> None:
        room = self.costs.get(name, 0.0) - self.reported.get(name, 0.0)
        units = max(0.0, min(units, room))
        self.reported[name] = self.reported.get(name, 0.0) + units
        self.bar.update(units)

    def drain(self, queue) -> None:
        import queue as q

        while True:
            try:
                name, fraction = queue.get_nowait()
            except q.Empty:
                return
            self.update(name, fraction * self.costs.get(name, 0.0))

    def start(self, job: Job) -> None:
        self.running.append(job)
        self.costs[job.name] = job.cost
        self.bar.set_postfix_str(", ".join(j.name for j in self.running), refresh=True)

    def finish(self, job: Job) -> None:
        self.running.remove(job)
        self.update(job.name, job.cost)  # the rest of its estimate
        self.bar.set_postfix_str(", ".join(j.name for j in self.running), refresh=True)
