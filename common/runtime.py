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
    page faults for memory it just had: with these two settings, reading a 1.3 MB body costs the
    receiver a fifth of the CPU (`python -m bench.run`). The memory stays bounded by what one
    batch or the requests in flight need at once. A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
