"""Worker processes for a matrix run: units of work handed out one at a time to whichever process
is free, the calling process included.

A unit is a list of cases that run as one piece (``engine.split_units``: one group's cases that
share a stack). Units are independent and every process runs the same code with the same thread
count, so a result never depends on which process produced it.

Pull, not push: a worker gets its next unit when it asks for one (a thread here answers at once,
while this process computes), so a worker still importing torch (~1.5 s) holds no work back and
a run too small to need it finishes without waiting for it. Processes are spawned, not forked: a
forked copy of a process that has started OpenMP or CUDA can hang. Workers ignore Ctrl-C; the
calling process stops them and keeps what has finished. A worker whose parent is gone — even
SIGKILLed, with no chance to stop anyone — exits at once, mid-unit or idle (``_exit_with_parent``).

Why not ``concurrent.futures.ProcessPoolExecutor`` (``max_tasks_per_child``) or loky: tried here
(Python 3.11, loky 3.7), neither gives these guarantees. A worker that dies breaks the whole
executor (``BrokenProcessPool``, loky's ``TerminatedWorkerError``): every unit in flight on every
worker is lost, not only the dead worker's. Both push work to workers ahead of time, so a unit can
wait on a worker that is still importing torch while this process is idle. And their workers
outlive a SIGKILLed parent: ProcessPoolExecutor's were still alive 12 minutes later, loky's
(mid-task) 25 s later, when the check stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
from collections import deque
from typing import Callable, Sequence

__all__ = ["usable_cores", "run_units", "prestarted"]

POLL_SECONDS = 0.2  # how often the dispatcher checks that busy workers are still alive
# what a unit imports (torch ~1 s, the engine, the theory's scipy): a worker started ahead loads them
# while its parent is still starting up
_WARM_MODULES = ("torch", "precision_suite.runner", "precision_suite.engine.torch_emulated", "precision_suite.theory")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_units(units: Sequence, run_unit: Callable, *, jobs: int, on_done: Callable, on_failed: Callable,
              worker_setup: Callable | None = None, local: Callable = lambda unit: False) -> None:
    """Run every unit: ``run_unit(unit)`` here or in one of ``jobs - 1`` spawned workers.

    ``on_done(unit, output)`` and ``on_failed(unit, message)`` are called in this thread as units
    finish, in completion order. Units for which ``local(unit)`` is true run here only (a GPU's
    units: one process per device). ``run_unit`` and ``worker_setup`` (a context-manager factory
    each worker runs under, e.g. thread settings) must be picklable: module-level functions or
    ``functools.partial`` of them. Units should come biggest first (a short one last balances the end).
    """
    mine = deque(u for u in units if local(u))
    shared = deque(u for u in units if not local(u))
    if jobs <= 1 or len(shared) <= 1:
        for unit in (*mine, *shared):
            on_done(unit, run_unit(unit))
        return
    pool = _Workers(min(jobs, len(shared)) - 1, shared, run_unit, worker_setup)  # no idle workers
    try:
        while True:
            pool.report(on_done, on_failed)
            unit = mine.popleft() if mine else pool.take()
            if unit is not None:
                on_done(unit, run_unit(unit))
            elif pool.running():
                pool.report(on_done, on_failed, wait=True)
            else:
                break
        pool.report(on_done, on_failed)
    finally:
        pool.stop()


class _Spares:
    """Workers spawned ahead of the run (``prestart``), waiting for their code; ``run_units``
    adopts them. Their one result queue is shared with any worker spawned later beside them."""

    def __init__(self):
        self.results = None
        self.waiting: list[tuple] = []  # (process, its task queue)

    def spawn(self, count: int) -> None:
        if count <= 0:
            return
        ctx = multiprocessing.get_context("spawn")
        if not self.waiting:  # a queue of its own for each prestarted block (none outlives one)
            self.results = ctx.Queue()
        for _ in range(count):
            wid, tasks = len(self.waiting), ctx.SimpleQueue()
            proc = ctx.Process(target=_worker_main, args=(wid, tasks, self.results, None),
                               name=f"precision-suite-worker-{wid}", daemon=True)
            proc.start()
            self.waiting.append((proc, tasks))

    def take(self, count: int) -> tuple:
        """(result queue, [(process, task queue)]) of up to ``count`` spares, now adopted with their
        queue (the adopting pool closes it); spares beyond ``count`` are not needed and end."""
        taken, self.waiting = self.waiting[:count], self.waiting[count:]
        results = self.results if taken else None
        self._end(self.waiting)
        if not taken:
            self.stop()
        self.waiting, self.results = [], None
        return results, taken

    def stop(self) -> None:
        """Spares no run adopted (a run that stayed in one process): ended at once, mid-import or
        idle, with their queue."""
        self._end(self.waiting)
        if self.results is not None:
            self.results.close()
        self.waiting, self.results = [], None

    @staticmethod
    def _end(spares: list) -> None:
        for proc, _ in spares:
            proc.terminate()
        for proc, _ in spares:
            proc.join()


_SPARES = _Spares()


@contextlib.contextmanager
def prestarted(count: int):
    """Spawn ``count`` workers on entry, before this process's own imports, so that their start-up
    (torch and the engine, ~1.5 s) overlaps this process's; ``run_units`` inside the block adopts
    them. Spares no run adopted (a run that stayed in one process) are ended on exit; like every
    worker, they also leave at once if this process dies."""
    _SPARES.spawn(count)
    try:
        yield
    finally:
        _SPARES.stop()


class _Workers:
    """Spawned processes, each with its own task queue and one shared result queue, and the
    dispatcher thread that feeds them from ``shared`` (which this process also takes from)."""

    def __init__(self, count: int, shared: deque, run_unit: Callable, worker_setup: Callable | None):
        ctx = multiprocessing.get_context("spawn")
        self.shared, self.lock = shared, threading.Lock()
        code = pickle.dumps((run_unit, worker_setup))  # unpickled (importing torch & co.) once the parent is watched
        results, adopted = _SPARES.take(count)
        self.results = results if adopted else ctx.Queue()
        self.procs, self.tasks = [p for p, _ in adopted], [t for _, t in adopted]
        for tasks in self.tasks:
            tasks.put(code)  # a spare's first message: what to run
        fresh = []
        for wid in range(len(adopted), count):
            self.tasks.append(ctx.SimpleQueue())
            self.procs.append(ctx.Process(target=_worker_main, args=(wid, self.tasks[wid], self.results, code),
                                          name=f"precision-suite-worker-{wid}", daemon=True))
            fresh.append(self.procs[-1])
        self.busy: dict[int, object] = {}  # worker -> its unit
        self.finished: queue.Queue = queue.Queue()  # ("done" | "failed", unit, output or message)
        self.stopping = threading.Event()
        for p in fresh:
            p.start()
        self.dispatcher = threading.Thread(target=self._dispatch, name="precision-suite-dispatcher", daemon=True)
        self.dispatcher.start()

    def take(self):
        """The next shared unit for this process, or None."""
        with self.lock:
            return self.shared.popleft() if self.shared else None

    def running(self) -> bool:
        with self.lock:
            return bool(self.busy) or not self.finished.empty()

    def report(self, on_done: Callable, on_failed: Callable, wait: bool = False) -> None:
        """Hand finished units to the callbacks (after waiting up to POLL_SECONDS for one if ``wait``)."""
        try:
            item = self.finished.get(timeout=POLL_SECONDS) if wait else self.finished.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, unit, payload = item
            (on_done if kind == "done" else on_failed)(unit, payload)
            try:
                item = self.finished.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self) -> None:
        """Answer each worker that asks for work; notice workers that died mid-unit."""
        while not self.stopping.is_set():
            try:
                wid, kind, output = self.results.get(timeout=POLL_SECONDS)
                if kind == "done":
                    output = pickle.loads(output)
            except queue.Empty:
                self._reap()
                continue
            except Exception as exc:  # noqa: BLE001 - a worker died mid-message: no answer can be trusted
                self._abandon(f"lost the workers' results ({type(exc).__name__}: {exc})")
                return
            with self.lock:
                if kind != "ready":
                    self.finished.put((kind, self.busy.pop(wid), output))
                unit = self.shared.popleft() if self.shared else None
                if unit is not None:
                    self.busy[wid] = unit
            self.tasks[wid].put(unit)  # None: nothing left, the worker exits

    def _abandon(self, message: str) -> None:
        """Fail every unit a worker holds; the rest of the shared units fall to this process."""
        with self.lock:
            for unit in self.busy.values():
                self.finished.put(("failed", unit, message))
            self.busy.clear()

    def _reap(self) -> None:
        with self.lock:
            for wid, unit in list(self.busy.items()):
                code = self.procs[wid].exitcode
                if code is not None:
                    del self.busy[wid]
                    why = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
                    self.finished.put(("failed", unit, f"worker process exited with code {code}{why}"))

    def stop(self) -> None:
        """End every worker. By now none holds unfinished work that will be collected (or the run
        was interrupted), so those still alive — importing, idle or mid-unit — are terminated."""
        self.stopping.set()
        self.dispatcher.join()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join()
        self.results.close()


def _worker_main(wid: int, tasks, results, code: bytes | None) -> None:
    """A worker: ask for a unit, run it, send its output back, until told to stop (None).
    ``code``: the pickled ``(run_unit, worker_setup)``; None for a spare (``prestart``), which
    imports what units need and then waits for its code as its first task (None: not needed)."""
    import importlib

    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    if code is None:
        for name in _WARM_MODULES:
            importlib.import_module(name)
        code = tasks.get()
        if code is None:
            return
    run_unit, worker_setup = pickle.loads(code)
    with worker_setup() if worker_setup is not None else contextlib.nullcontext():
        results.put((wid, "ready", None))
        for unit in iter(tasks.get, None):
            try:  # pickled here: the queue's own pickling happens in a thread that drops what fails
                message = (wid, "done", pickle.dumps(run_unit(unit), protocol=pickle.HIGHEST_PROTOCOL))
            except Exception as exc:  # noqa: BLE001 - reported as the unit's failure, never lost
                message = (wid, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
            results.put(message)


PARENT_GONE_EXIT = 75  # a worker's exit code when it left because its parent had died


def _exit_with_parent() -> None:
    """Exit this worker the moment its parent dies. ``parent_process().sentinel`` is a pipe whose
    other end only the parent holds: the kernel closes it when the parent exits by any means
    (SIGKILL included), and it turns readable. A daemon thread waits on it, so a unit mid-computation
    is abandoned too (its result could not be delivered)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="precision-suite-parent-watch", daemon=True).start()
