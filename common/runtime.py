"""What both entry points set up in their process before serving: the event loop and malloc."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused; larger ones are mapped and unmapped
# each time. Above the largest body the receiver takes by default (16 MiB).
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap kept for reuse rather than given back to the kernel.
TRIM_THRESHOLD = 64 * 1024 * 1024
# What a receiver process faults in at start and keeps (warm_heap): about what the first wave of
# a burst of 64 full payloads in flight, 32 per process, holds at once. Below TRIM_THRESHOLD,
# or glibc would give it back.
WARM_HEAP_BYTES = 48 * 1024 * 1024
_WARM_BLOCK = 1024 * 1024  # heap blocks, well below MMAP_THRESHOLD


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it exists (not on Windows): the same code, less CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def keep_freed_memory() -> None:
    """Let glibc reuse the memory of a freed request body instead of returning it to the kernel.

    Every webhook body, decompressed message and decoded batch is a buffer of a megabyte or
    more. By default glibc maps each one afresh and unmaps it when freed, so every request pays
    page faults for memory it just had. The memory stays bounded by what one
    batch or the requests in flight need at once. A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def warm_heap(size: int = WARM_HEAP_BYTES) -> None:
    """Fault in `size` bytes of heap now, and keep them for reuse (after keep_freed_memory).

    A new process's heap grows a page at a time as the bodies of its first burst arrive, and
    each new page is a page fault while the burst waits for its answers. Faulted in at start,
    the first burst after a restart finds the memory every later one reuses. The process holds
    it from the start rather than from its first burst on. Where the
    C library is not glibc the memory is freed again: no harm done.
    """
    blocks = [b"\x01" * _WARM_BLOCK for _ in range(size // _WARM_BLOCK)]  # written: faulted in
    del blocks
