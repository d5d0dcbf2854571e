"""What jobs of a req_grp really need, learned from the ones that completed.

For each req_grp (by default the command's first word) the peak RAM and the wall time of the most
recent completed runs are kept (at most WINDOW of each, in memory and in the store). The
recommendation is their 95th percentile, rounded up to 100 MB or to the second; with fewer than
MIN_SAMPLES runs there is no recommendation. A job's `override` says how it is used, as in wr:
0 the learned value replaces the requested one, 1 the larger of the two, 2 the requested one.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

WINDOW = 1000
MIN_SAMPLES = 3
PERCENTILE = 0.95


def percentile(values: list[float], fraction: float = PERCENTILE) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class ResourceLearner:
    def __init__(self) -> None:
        self._samples: dict[str, tuple[deque[int], deque[float]]] = {}
        self._cache: dict[str, Optional[tuple[int, float]]] = {}

    def record(self, req_grp: str, peak_ram: int, walltime: float) -> None:
        ram, secs = self._samples.setdefault(req_grp, (deque(maxlen=WINDOW), deque(maxlen=WINDOW)))
        ram.append(peak_ram)
        secs.append(walltime)
        self._cache.pop(req_grp, None)

    def recommendation(self, req_grp: str) -> Optional[tuple[int, float]]:
        """(MB, seconds) learned for this req_grp, or None while too few runs are known."""
        if req_grp not in self._cache:
            samples = self._samples.get(req_grp)
            if samples is None or len(samples[0]) < MIN_SAMPLES:
                self._cache[req_grp] = None
            else:
                ram = max(100, math.ceil(percentile(list(samples[0])) / 100) * 100)
                secs = max(1.0, float(math.ceil(percentile(list(samples[1])))))
                self._cache[req_grp] = (ram, secs)
        return self._cache[req_grp]

    def expected(self, req_grp: str, memory: int, seconds: float, override: int) -> tuple[int, float]:
        learned = self.recommendation(req_grp)
        if learned is None or override == 2:
            return memory, seconds
        if override == 1:
            return max(memory, learned[0]), max(seconds, learned[1])
        return learned


def memory_after_ram_failure(peak: int, requested: int) -> int:
    """What a retry after "used too much RAM" asks for (wr's rule): twice the peak (1.3 times above
    8 GB), at least the peak plus 1000 MB, rounded up to 100 MB; never less than before."""
    peak = max(peak, requested)
    bigger = peak * 2 if peak <= 8192 else peak * 1.3
    return max(requested, int(math.ceil(max(bigger, peak + 1000) / 100) * 100))
