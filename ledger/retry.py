"""When an automatic retry is due: exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class RetryPolicy:
    """Delay before automatic retry number `n` (n = 1 for the second attempt of a run).

    The delay is "equal jitter": half of the exponential step is fixed and half random, so
    delays grow from one retry to the next (unlike full jitter) while retries of many tasks
    that failed together still spread out.
    """

    base_seconds: float = 1.0
    factor: float = 2.0
    max_seconds: float = 300.0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def delay(self, retry_number: int) -> float:
        step = min(self.max_seconds, self.base_seconds * self.factor ** (retry_number - 1))
        return step / 2 + self.rng.uniform(0, step / 2)
