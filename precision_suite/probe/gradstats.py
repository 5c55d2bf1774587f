"""The loss-scale advice's two numbers of an exact gradient (``stats.GRAD_EXTRA_STATS``), for
one float32 tensor at a time, by radix selection.

    exact_amax = max |e| (NaN counted as zero)
    exact_q    = the (m+1)-th smallest significant |e| (|e| >= eps * rms of the finite values),
                 m = ceil(threshold * n) - 1; inf when fewer are significant

The same numbers as ``engine.torch_stats.grad_extra_stats`` (a test holds them equal), found
without its top-k partial sort, which costs ~3x more on the megabyte-sized gradients of a real
model: the magnitudes' bit patterns order like the values, so a histogram of their top 16 bits
names the bin holding rank m+1, and only that bin's few elements are selected from.
"""

from __future__ import annotations

import math

import numpy as _np
import torch

from ..formats import Format

__all__ = ["grad_extras"]

_BINS = 1 << 15  # non-negative int32 patterns >> 16
_INF_BITS = int(_np.array(_np.inf, dtype=_np.float32).view(_np.int32))


def _floor_bits(a, fmt: Format, all_finite: bool) -> int:
    """The bit pattern of the smallest float32 at or above eps * rms(finite |e|), at least 1."""
    count = a.numel()
    if not all_finite:
        finite = torch.isfinite(a)
        count = int(finite.sum())
        a = torch.where(finite, a, 0.0)
    if count == 0:
        return _INF_BITS
    t = fmt.eps * float(torch.linalg.vector_norm(a, dtype=torch.float64)) / math.sqrt(count)
    t32 = _np.float32(t)
    if float(t32) < t:
        t32 = _np.nextafter(t32, _np.float32(_np.inf))
    return max(int(_np.array(t32, dtype=_np.float32).view(_np.int32)), 1)


def grad_extras(exact, threshold: float, fmt: Format) -> tuple[float, float]:
    """(exact_amax, exact_q) of one float32 gradient tensor."""
    a = exact.detach().reshape(-1).abs()
    n = a.numel()
    amax = raw = float(a.amax())
    if math.isnan(amax):
        amax = float(torch.nan_to_num(a, nan=0.0, posinf=math.inf).amax())
    m = math.ceil(threshold * n) - 1
    if m >= n:
        return amax, math.inf
    floor = _floor_bits(a, fmt, all_finite=math.isfinite(raw))
    # below the floor (zeros too) wraps to the top; significant elements keep their order
    lifted = a.view(torch.int32).sub(floor).bitwise_and_(torch.iinfo(torch.int32).max)
    hi = lifted >> 16
    counts = torch.bincount(hi, minlength=_BINS).cumsum(0)
    b = int(torch.searchsorted(counts, m + 1))
    below = int(counts[b - 1]) if b else 0
    qb = int(torch.kthvalue(lifted[hi == b], m + 1 - below).values)
    if qb >= _INF_BITS - floor:  # fewer than m + 1 significant, non-NaN values
        return amax, math.inf
    return amax, float(_np.array(qb + floor, dtype=_np.int32).view(_np.float32))
