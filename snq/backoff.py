"""
The delay before a retry or a reconnection.
"""

import random


def backoff(attempts: int, base: float, ceiling: float, rng=random) -> float:
    """
    Exponential backoff with "equal jitter": half the delay is fixed, so a
    retry never comes at once, and half random, so a burst of failures does
    not come back as a burst.
    """
    delay = min(ceiling, base * 2 ** max(attempts - 1, 0))
    return delay / 2 + rng.uniform(0, delay / 2)
