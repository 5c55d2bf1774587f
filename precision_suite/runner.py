"""Run a matrix: cases -> engine -> ``Results``, with progress and a journal that survives interrupts.

``run_matrix`` is the one entry point the CLI, the pytest plugin and notebooks share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
from pathlib import Path
from typing import Callable

from .environment import check_parallel, fingerprint, resolve_threads
from .formats import get_format
from .keywords import strict_keywords
from .results import CaseResult, Results, write_json_atomic
from .spec import Case, Matrix

WORKER_MIN_SECONDS = 3.0  # estimated work below which a run stays in one process

__all__ = ["run_matrix", "run_case", "RunInterrupted", "check_memory", "estimate_case_bytes",
           "estimated_seconds", "default_jobs"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, where the caller turns it into KeyboardInterrupt) stopped a run.
    ``results``: the cases that finished (also written to ``json_path`` when one was given);
    ``journal``: the file ``run_matrix(..., resume=True)`` finishes the run from, or None.
    The original interrupt is ``__cause__``."""

    def __init__(self, results: Results, journal: Path | None):
        super().__init__(f"interrupted after {len(results.cases)} cases")
        self.results, self.journal = results, journal


def _available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate_case_bytes(case: Case, backward: bool) -> int:
    """Peak host bytes of one case: float64 draws + the chain; backward keeps ~8 activation-sized
    tensors and 2 weights per layer for autograd (wide dtype: 4 bytes, fp32's wide fp64: 8)."""
    act = case.batch * case.width
    weight = case.width * case.width
    wide = 8 if get_format(case.format).wide().name == "fp64" else 4  # fp32 storage of a scaled format too
    draws = 8 * (2 * act + 3 * weight)
    if not backward:
        return draws + wide * (6 * act + 2 * weight)
    return draws + case.depth * wide * (8 * act + 2 * weight)


def check_memory(cases: list[Case], backward: bool) -> None:
    """Refuse, before anything runs, a case that cannot fit in this machine's memory."""
    from .spec import SpecError

    budget = _available_memory()
    for case in cases:
        need = estimate_case_bytes(case, backward)
        if need > budget:
            raise SpecError(f"case {case.id} needs about {need / 2**30:.1f} GiB"
                            f"{' (backward keeps every layer)' if backward else ''}; "
                            f"{budget / 2**30:.1f} GiB available — reduce --depth/--width/--batch"
                            f"{' or use --no-backward' if backward else ''}")


@contextlib.contextmanager
def exact_wide_matmuls():
    """The wide precision must be real fp32: no TF32 for fp32 matmuls and convolutions while the
    suite runs. The fp16/bf16 reduced-precision-reduction flags are left as the user set them:
    they change only native low-precision kernels, which is what native mode is there to measure."""
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` threads in torch and in the BLAS and OpenMP pools numpy and scipy
    load (threadpoolctl), restored afterwards. None: OMP_NUM_THREADS if the user set it, else 1.
    The suite's tensors are small: on this 2-core machine a second thread gained ~12% on an idle
    machine, while spin-waiting pools made the default matrix 45x slower (12 s -> 548 s) next to
    one other busy process, and numpy's OpenBLAS threads stalled two worker processes for 14-20 s.
    Wide chains: --threads N."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = resolve_threads(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(saved)


def estimated_seconds(case: Case, backward: bool) -> float:
    """Rough single-thread CPU seconds of a case: ~20 us of per-op overhead per layer plus ~10 ns
    per element of the layer's activations and weight, 3x with backward (fits the default matrix,
    8.9 s, and a forward w256 b1024 chain, 3.4 ms a layer, on this machine to ~10%), 1.3x where
    float64 arithmetic is involved (fp32's exact values; bf16's activations) and 1.6x for a scaled
    format's quantizers, so that the costlier units go first and a run ends on cheap ones."""
    fmt = get_format(case.format)
    storage = fmt.scaling.storage if fmt.scaling is not None else fmt.name
    factor = (1.3 if storage in ("fp32", "fp64", "bf16") else 1.0) * (1.6 if fmt.scaling is not None else 1.0)
    elements = case.batch * case.width + case.width * case.width
    return factor * case.depth * (20e-6 + 10e-9 * elements * (3 if backward else 1))


def default_jobs(units: list[list[Case]], backward: bool) -> int:
    """One process per usable core, at most one per unit, no more than memory holds at the largest
    unit's estimated peak (``estimate_case_bytes``) each, and one for runs under WORKER_MIN_SECONDS
    (a worker costs ~1.5 s of a core to start)."""
    from .workers import usable_cores

    if sum(estimated_seconds(c, backward) for unit in units for c in unit) < WORKER_MIN_SECONDS:
        return 1
    largest = max(sum(estimate_case_bytes(c, backward) for c in unit) for unit in units)
    return max(1, min(usable_cores(), len(units), _available_memory() // max(largest, 1)))


def _run_unit(unit: list[Case], backward: bool, rel_error: bool) -> list[CaseResult]:
    from .engine import run_cases
    from .journal import kill_point

    if multiprocessing.parent_process() is None:  # the test hook names the run's own process, not a worker
        kill_point("unit")

    return run_cases(unit, backward=backward, rel_error=rel_error)


@contextlib.contextmanager
def _process_settings(threads: int | None):
    """What every process of a run computes under: real fp32 matmuls and the run's thread count."""
    with exact_wide_matmuls(), torch_threads(threads):
        yield


@strict_keywords(forwards_to=Matrix)  # run_matrix(depht=5) must not run depth 100
def run_matrix(matrix: Matrix | None = None, *, cases: list[Case] | None = None, backward: bool = True,
               rel_error: bool = False, json_path: str | os.PathLike | None = None, resume: bool = False,
               on_result: Callable[[CaseResult], None] | None = None,
               on_restored: Callable[[list[CaseResult]], None] | None = None, threads: int | None = None,
               jobs: int | None = 1, **axes) -> Results:
    """Run a matrix (or an explicit case list) and return its Results.

    ``threads``: torch intra-op threads per process (see ``torch_threads``; default 1).
    ``jobs``: processes that run units (``engine.split_units``) side by side, this one included;
    None: ``default_jobs``. Results do not depend on it; GPU units stay in this process. Workers
    are spawned and import the calling script, so a script that asks for jobs > 1 needs the usual
    ``if __name__ == "__main__":`` guard.
    ``axes`` are Matrix options as in the CLI (``inits="normal,kaiming_normal", depth=[50, 100]``).
    With ``json_path`` every finished case is journaled beside it as it comes (``journal``), the
    results are written atomically at the end and the journal removed. ``resume=True`` reads an
    interrupted run's journal back (``on_restored`` gets those cases) and runs only the cases it
    lacks; the journal must be of the same cases and passes (else ``JournalError``). An interrupt
    writes the finished cases to ``json_path`` and raises ``RunInterrupted``.
    ``on_result`` is called with each case run now, as it finishes.
    """
    from .engine import split_units
    from .engine.support import skip_reason
    from .journal import Journal, journal_path, kill_point, run_identity
    from .workers import run_units

    _check_run_options(backward=backward, rel_error=rel_error, resume=resume, json_path=json_path, threads=threads,
                       jobs=jobs)
    if axes and (cases is not None or matrix is not None):  # they would be ignored silently
        raise TypeError(f"run_matrix: axes ({', '.join(sorted(axes))}) go with neither matrix= nor cases=; "
                        "give one of the three")
    if cases is None:
        matrix = matrix if matrix is not None else Matrix.from_options(**axes)
        cases = matrix.cases()
    if resume and json_path is None:
        raise TypeError("run_matrix: resume=True needs json_path (the journal lives beside the results)")
    env = fingerprint(threads)
    environments, created, journal = [env], None, None
    encoded: dict[str, dict] = {}  # each journaled case's JSON dict, reused by the final write
    skipped, journaled, lost = [], [], []  # lost: units whose worker died; not journaled, so a resume reruns them

    def record(result: CaseResult):
        if journal is not None:
            encoded[result.id] = result.to_dict()
            journal.record(encoded[result.id])
        journaled.append(result)
        if on_result is not None:
            on_result(result)

    def unit_done(unit: list[Case], results: list[CaseResult]):
        for result in results:
            record(dataclasses.replace(result, environment=env_index))
        if journal is not None:
            journal.sync()

    def unit_failed(unit: list[Case], message: str):
        for c in unit:
            lost.append(CaseResult(c, status="error", error=message, environment=env_index))
            if on_result is not None:
                on_result(lost[-1])

    def results_of(finished: list[CaseResult]) -> Results:
        order = {c.id: i for i, c in enumerate(cases)}
        kept = Results(tuple(sorted(finished, key=lambda r: order[r.id])), tuple(environments))
        return kept if created is None else dataclasses.replace(kept, created=created)

    threads = resolve_threads(threads)
    try:
        env_index = 0
        if json_path is not None:
            journal = Journal.start(journal_path(json_path), run_identity(cases, backward, rel_error), resume)
            env_index, environments, created = journal.environment_index(env), journal.environments, journal.created
            restored = _restored(journal, cases)
            journaled.extend(restored)
            if restored and on_restored is not None:
                on_restored(restored)
        done = {r.id for r in journaled}
        runnable = []
        for c in cases:
            reason = None if c.id in done else skip_reason(c)
            if reason:
                skipped.append(CaseResult(c, status="skipped", skip_reason=reason, environment=env_index))
            elif c.id not in done:
                runnable.append(c)
        units = sorted(split_units(runnable), key=lambda u: -sum(estimated_seconds(c, backward) for c in u))
        with _process_settings(threads):
            run_units(units, functools.partial(_run_unit, backward=backward, rel_error=rel_error),
                      jobs=default_jobs(units, backward) if jobs is None else jobs, on_done=unit_done,
                      on_failed=unit_failed, worker_setup=functools.partial(_process_settings, threads),
                      local=lambda unit: unit[0].device != "cpu")
        results = results_of(journaled + skipped + lost)
        if json_path is not None:
            kill_point("final-write")
            write_json_atomic(json_path, results.to_dict(encoded))
            kill_point("results-written")
            journal.remove()
    except KeyboardInterrupt as exc:
        partial = results_of(journaled + skipped)
        if journal is not None:
            journal.close()
            write_json_atomic(json_path, partial.to_dict(encoded))
        raise RunInterrupted(partial, journal and journal.path) from exc
    finally:
        if journal is not None:
            journal.close()
    return results


def _check_run_options(*, backward, rel_error, resume, json_path, threads, jobs) -> None:
    """run_matrix's own options, as the CLI checks its flags: a SpecError naming the value (``jobs=0``
    ran one process, ``backward="no"`` ran the backward pass)."""
    from .spec import SpecError

    for name, value in (("backward", backward), ("rel_error", rel_error), ("resume", resume)):
        if not isinstance(value, bool):
            raise SpecError(f"run_matrix: {name} must be True or False, got {value!r}")
    for name, value in (("threads", threads), ("jobs", jobs)):
        if value is not None and (why := check_parallel(name, value)):
            raise SpecError(f"run_matrix: {why} (or None)")
    if json_path is not None and not isinstance(json_path, (str, os.PathLike)):
        raise SpecError(f"run_matrix: json_path must be a str or os.PathLike, got {type(json_path).__name__}")


def _restored(journal, cases: list[Case]) -> list[CaseResult]:
    """The journal's cases as results (its own writing: a case that does not read back, or is not
    one of the run's, is damage)."""
    from .journal import JournalError

    ids = {c.id for c in cases}
    try:
        restored = [CaseResult.from_dict(d) for d in journal.restored.values()]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        restored, why = None, f"{type(e).__name__}: {e}"
    else:
        stray = [r.id for r in restored if r.id not in ids]
        why = f"{stray[0]} is not one of the run's cases" if stray else None
    if why:
        raise JournalError(f"journal {journal.path} holds a case that does not read back ({why}); "
                           f"run again without --resume to start over")
    return restored


@strict_keywords(forwards_to=Case)
def run_case(case: Case | None = None, *, backward: bool = True, rel_error: bool = False, **fields) -> CaseResult:
    """Run one case (``run_case(init="normal", activation="relu", format="fp16")``)."""
    case = case if case is not None else Case(**fields)
    return run_matrix(cases=[case], backward=backward, rel_error=rel_error).cases[0]
