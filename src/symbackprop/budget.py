"""The generation budget: no single sympy simplification may run unbounded, and no
command may take unbounded memory.

Rational simplification (``cancel``/``factor``) is what makes a derivative readable, and
the one step whose cost can explode (a fused chain, a wide formula). It runs under a
per-expression time limit; past it, the unsimplified (equally correct) expression is
kept and the run says so once on stderr. Specs are capped elsewhere (formula size,
exponents, fusion length), so the limit is a backstop, not the common path.

Memory is capped the same way, as a backstop: the command line derives and renders under
an address-space limit (:func:`memory_cap`, ``SYMBACKPROP_MEMORY_MB`` more than the
process had when it started, 4096 by default); past it, the command stops with one line
(exit 2) and writes nothing, instead of swapping the machine or being killed.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from .errors import SymbackpropError

T = TypeVar("T")

SIMPLIFY_SECONDS = 2.0
MEMORY_MB = 4096
_SLACK = 64 * 2**20  # how close to the cap a failed allocation leaves the address space
expired: list[str] = []  # where the limit was hit, for the one-line note


class _Expired(Exception):
    pass


def within(seconds: float, compute: Callable[[], T], fallback: Callable[[], T],
           where: str = "") -> T:
    """``compute()``, or ``fallback()`` when it runs longer than ``seconds``.

    The limit needs SIGALRM, so it applies in the main thread of a Unix process (the
    command line); elsewhere, or inside another limit, ``compute()`` runs unbounded."""
    if (not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        return compute()

    def expire(signum: int, frame: object) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return compute()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        expired.append(where)
        return fallback()
    finally:
        signal.signal(signal.SIGALRM, previous)


def note() -> str | None:
    """A one-line note when the limit was hit during this run (then forgets it)."""
    if not expired:
        return None
    count = len(expired)
    expired.clear()
    return (f"note: simplifying {count} expression(s) took longer than "
            f"{SIMPLIFY_SECONDS:g} s each; they were kept unsimplified (still exact)")


class MemoryBudgetError(SymbackpropError):
    """The command needed more memory than the generation budget allows."""


def _memory_mb() -> int:
    raw = os.environ.get("SYMBACKPROP_MEMORY_MB", "")
    if not raw:
        return MEMORY_MB
    if not raw.isdigit() or int(raw) == 0:
        raise SymbackpropError(f"SYMBACKPROP_MEMORY_MB must be a positive whole number of "
                               f"megabytes, not {raw!r}")
    return int(raw)


def _address_space() -> int | None:
    """This process's mapped address space in bytes (Linux), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def memory_cap(what: str) -> Iterator[None]:
    """Run the block with at most ``SYMBACKPROP_MEMORY_MB`` more address space.

    A :class:`MemoryBudgetError` naming ``what`` replaces the ``MemoryError`` that the
    limit turns an oversized allocation into. Where the platform has no address-space
    limit (not Linux), the block runs uncapped. The limit is process-wide, so only the
    command line sets it, not the library API."""
    limit_mb = _memory_mb()
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        resource = None  # type: ignore[assignment]
    used = _address_space()
    if resource is None or used is None:  # pragma: no cover - not Linux
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + limit_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    except (MemoryError, SystemError, OSError) as exc:
        # An allocation the limit refused surfaces as MemoryError, or, inside some C
        # code (the import system, sympy's caches), as a SystemError or an OSError with
        # ENOMEM (a lazy import of sympy.physics reading its folder); those count only
        # when the address space is at the cap, else they propagate.
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # room to look and report
        if isinstance(exc, OSError) and exc.errno != errno.ENOMEM:
            raise
        now = _address_space()
        if not isinstance(exc, MemoryError) and (now is None or now < cap - _SLACK):
            raise
        raise MemoryBudgetError(
            f"symbackprop: {what} needed more than its memory budget of {limit_mb} MB; "
            "nothing was written (set SYMBACKPROP_MEMORY_MB to allow more)") from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
