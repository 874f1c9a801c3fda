"""The generation budget: no single sympy simplification may run unbounded.

Rational simplification (``cancel``/``factor``) is what makes a derivative readable, and
the one step whose cost can explode (a fused chain, a wide formula). It runs under a
per-expression time limit; past it, the unsimplified (equally correct) expression is
kept and the run says so once on stderr. Specs are capped elsewhere (formula size,
exponents, fusion length), so the limit is a backstop, not the common path.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SIMPLIFY_SECONDS = 2.0
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
