"""Progress while a matrix runs: a tqdm bar on a terminal, plain lines when stderr is not one (CI logs)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``update(result)`` after each finished case, ``restore(results)`` for the cases a resumed
    run read back from its journal; a context manager that closes the bar."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="case", file=self.stream, dynamic_ncols=True)

    def restore(self, results) -> None:
        self.done += len(results)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(len(results))
            return
        print(f"[{self.done}/{self.total}] resumed: {len(results)} finished cases read back from the journal",
              file=self.stream, flush=True)

    def update(self, result) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(result.id[:60], refresh=False)
            self._bar.update(1)
            return
        fwd = result.forward.events.failure if result.forward is not None else None
        what = result.status if result.status != "ok" else (
            f"{fwd['kind']} at layer {fwd['layer']}" if fwd else f"survived {result.case.depth}")
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done}/{self.total} {elapsed:6.1f}s] {result.id}: {what}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False
