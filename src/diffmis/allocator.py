"""The process allocator setting (imports nothing heavy: the CLI calls it before torch loads)."""

from __future__ import annotations

__all__ = ["tune_malloc"]


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): the in-process form of the CLI's ``GLIBC_TUNABLES``.

    With glibc's defaults every large tensor buffer is mmapped and returned on free, and PyTorch on CPU then
    spends much of its time in page faults. Raising the mmap and trim thresholds keeps the heap. Called
    explicitly (tests, CLI), never at import. Returns False where it does not apply (not glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not libc.mallopt(m_mmap_threshold, 1 << 30):  # newer glibc accepts up to HEAP_MAX; older caps at 32 MiB
        libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    return True
