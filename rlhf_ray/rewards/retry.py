"""Waits between attempts of the remote reward paths (the http source, endpoint judges, Serve handles)."""

from __future__ import annotations

import random

MAX_WAIT_S = 30.0  # the longest backoff or Retry-After wait before a retry


def backoff_s(base_s: float, attempt: int, cap_s: float = MAX_WAIT_S) -> float:
    """Exponential backoff `base_s · 2^attempt`, capped, with equal jitter (half fixed, half random) so
    concurrent callers do not retry in lockstep."""
    delay = min(cap_s, base_s * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def retry_after_s(value: str | None, cap_s: float = MAX_WAIT_S) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds within [0, cap_s]; None when absent or not a
    number of seconds (an HTTP-date). A negative or NaN value reads as 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return min(cap_s, max(0.0, seconds))  # max keeps 0.0 when seconds is NaN
