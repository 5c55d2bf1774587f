"""Allocator setting for the engine's allocation pattern (many short-lived multi-MiB tensors)."""

__all__ = ["keep_freed_memory"]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap instead of returning them to the OS.

    The chains allocate and free tensors of a few MiB per op; glibc serves those with mmap and
    unmaps them on free, so every op pays fresh page faults (~0.25 us per 4 KiB) — measured as
    a third of the default run's time here. This is glibc's M_MMAP_THRESHOLD/M_TRIM_THRESHOLD
    (what GLIBC_TUNABLES sets); a no-op where the C library is not glibc. Returns whether it applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 256 * 2**20))
