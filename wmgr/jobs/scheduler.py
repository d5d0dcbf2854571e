"""Which ready jobs start now: declared cores and memory packed against the machine's capacity.

Ready jobs are kept in groups of one shape (priority, cores, memory, limit groups), each a FIFO
heap by the order jobs were added. Limit groups are part of the shape so that when the first job
of a group is held back by a limit, the whole group is, and the pass moves on. A pass visits the groups by priority, then by size (larger first: they are
the hardest to place later), then by age, and starts from each as many jobs as fit. Work per pass
is proportional to the number of shapes and jobs started, not to the number of jobs waiting.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import psutil

from wmgr.jobs.model import Job


@dataclass
class Capacity:
    """What the machine offers to jobs. Jobs that ask for no cores still take a slot: at most
    `zero_core_slots` of them run at once (default eight per core)."""

    cores: float
    memory: int  # MB
    zero_core_slots: int

    @classmethod
    def detect(cls, cores: Optional[float] = None, memory: Optional[int] = None,
               zero_core_slots: Optional[int] = None) -> "Capacity":
        cores = cores if cores is not None else float(psutil.cpu_count() or 1)
        memory = memory if memory is not None else psutil.virtual_memory().total // (1024 * 1024)
        # wr allows twice the cores. Jobs that ask for no core are meant to be light, and short
        # ones spend most of their life being started and reaped: eight per core keeps the
        # machine busy with them (memory still caps how many run).
        slots = zero_core_slots if zero_core_slots is not None else max(1, int(8 * cores))
        return cls(cores=cores, memory=memory, zero_core_slots=slots)


Shape = tuple[int, float, int, tuple[str, ...]]  # priority, cores, memory, limit groups


class Scheduler:
    """Tracks what running jobs hold and picks the ready jobs that fit next."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.used_cores = 0.0
        self.used_memory = 0
        self.zero_core_running = 0
        self._groups: dict[Shape, list[tuple[int, str]]] = {}

    # -- ready jobs ----------------------------------------------------------------------------

    @staticmethod
    def shape(job: Job) -> Shape:
        return (job.spec.get("priority", 0), job.spec["cpus"], job.memory, tuple(job.spec.get("limit_grps") or ()))

    def push(self, job: Job) -> None:
        heapq.heappush(self._groups.setdefault(self.shape(job), []), (job.seq, job.key))

    def push_new(self, jobs: list[Job]) -> None:
        """Push jobs just added. Appending keeps a heap a heap when the new entry is not smaller
        than its parent, which holds for jobs newer than everything queued; otherwise, push."""
        groups = self._groups
        for job in jobs:
            entry = (job.seq, job.key)
            spec = job.spec  # the shape, as Scheduler.shape makes it (inline: once per added job)
            shape = (spec.get("priority", 0), spec["cpus"], job.memory, tuple(spec.get("limit_grps") or ()))
            heap = groups.get(shape)
            if heap is None:
                heap = groups[shape] = []
            if not heap or heap[(len(heap) - 1) // 2] <= entry:
                heap.append(entry)
            else:
                heapq.heappush(heap, entry)

    def never_fits(self, job: Job) -> bool:
        return job.cores > self.capacity.cores or job.memory > self.capacity.memory

    def fits(self, job: Job) -> bool:
        if job.memory > self.capacity.memory - self.used_memory:
            return False
        if job.cores == 0:
            return self.zero_core_running < self.capacity.zero_core_slots
        return job.cores <= self.capacity.cores - self.used_cores + 1e-9

    def take(self, job: Job) -> None:
        self.used_memory += job.memory
        if job.cores == 0:
            self.zero_core_running += 1
        else:
            self.used_cores += job.cores

    def release(self, job: Job) -> None:
        self.used_memory -= job.memory
        if job.cores == 0:
            self.zero_core_running -= 1
        else:
            self.used_cores -= job.cores

    def view(self, capacity: Capacity) -> "Scheduler":
        """A scheduler over the same ready jobs with another machine's free room (a worker
        pulling work): what it picks leaves the ready groups, its accounting is its own."""
        other = Scheduler(capacity)
        other._groups = self._groups
        return other

    def pick(self, lookup: Callable[[str], Optional[Job]], is_ready: Callable[[Job], bool],
             permits: Callable[[Job], bool] = lambda job: True, hand_misfits: bool = True) -> Iterator[Job]:
        """Yield ready jobs that fit, taking their resources. `lookup` and `is_ready` let stale
        entries (jobs deleted or changed since they were pushed) be dropped as they are met;
        `permits` says whether the job's limit groups let it start now. With `hand_misfits`, a
        job too big for the capacity is yielded too (for the caller to bury); without, it waits
        for a bigger machine."""
        order = sorted(
            (shape for shape, heap in self._groups.items() if heap),
            key=lambda s: (-s[0], -max(s[1] / max(self.capacity.cores, 1e-9), s[2] / max(self.capacity.memory, 1)),
                           self._groups[s][0][0]),
        )
        for shape in order:
            heap = self._groups[shape]
            while heap:
                seq, key = heap[0]
                job = lookup(key)
                if job is None or job.seq != seq or not is_ready(job) or self.shape(job) != shape:
                    heapq.heappop(heap)
                    continue
                # A job that can never fit is handed out all the same, so that the caller can
                # bury it ("resource requirements cannot be met") instead of it waiting forever.
                misfit = self.never_fits(job)
                if (misfit and not hand_misfits) or (not misfit and (not self.fits(job) or not permits(job))):
                    break
                heapq.heappop(heap)
                self.take(job)
                yield job
            if not heap:
                del self._groups[shape]

    def ready_shapes(self, lookup: Callable[[str], Optional[Job]]) -> list[tuple[Shape, int, float]]:
        """The ready groups in the order a pass visits them: (shape, jobs in it (an upper bound:
        stale entries count), expected seconds of its first job). For a batch scheduler sizing
        runners (wmgr.slurm)."""
        groups = [(shape, heap) for shape, heap in self._groups.items() if heap]
        groups.sort(key=lambda item: (-item[0][0], -item[0][1], -item[0][2], item[1][0][0]))
        shapes = []
        for shape, heap in groups:
            job = lookup(heap[0][1])
            shapes.append((shape, len(heap), job.expected_time if job is not None else 0.0))
        return shapes

    def waiting(self) -> int:
        return sum(len(heap) for heap in self._groups.values())
