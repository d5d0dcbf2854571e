"""wmgr.jobs.scheduler: packing declared cores and memory against the machine's capacity."""

from __future__ import annotations

import itertools
from typing import Optional

import pytest

from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.jobs.scheduler import Capacity, Scheduler

_seq = itertools.count(1)


def job(cpus: float = 1, memory: int = 100, priority: int = 0, name: Optional[str] = None,
        seq: Optional[int] = None) -> Job:
    seq = next(_seq) if seq is None else seq
    key = name or f"job{seq}"
    spec = {"cmd": key, "cwd": "/tmp", "rep_grp": "g", "cpus": cpus, "memory": memory, "time": 3600.0,
            "priority": priority, "retries": 0}
    return Job(key, spec, model.READY, seq)


class Queue:
    """The lookup a JobQueue gives the scheduler: jobs by key, ready when in state ready."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.jobs: dict[str, Job] = {}

    def add(self, *jobs: Job) -> None:
        for j in jobs:
            self.jobs[j.key] = j
            self.scheduler.push(j)

    def pick(self) -> list[str]:
        return [j.key for j in self.scheduler.pick(self.jobs.get, lambda j: j.state == model.READY)]


def setup(cores: float = 4, memory: int = 1000, zero: int = 8) -> tuple[Scheduler, Queue]:
    s = Scheduler(Capacity(cores=cores, memory=memory, zero_core_slots=zero))
    return s, Queue(s)


def test_cores_are_packed():
    s, q = setup(cores=4)
    q.add(*(job(cpus=1, name=f"j{i}") for i in range(6)))
    assert q.pick() == ["j0", "j1", "j2", "j3"]
    assert s.used_cores == 4
    assert q.pick() == []
    s.release(q.jobs["j1"])
    assert q.pick() == ["j4"]
    assert s.waiting() == 1


def test_fractional_cores():
    s, q = setup(cores=1)
    q.add(*(job(cpus=0.25, name=f"j{i}") for i in range(5)))
    assert q.pick() == ["j0", "j1", "j2", "j3"]


def test_memory_is_packed():
    s, q = setup(cores=100, memory=1000)
    q.add(job(cpus=1, memory=400, name="a"), job(cpus=1, memory=400, name="b"), job(cpus=1, memory=400, name="c"))
    assert q.pick() == ["a", "b"]
    assert s.used_memory == 800
    s.release(q.jobs["a"])
    assert s.used_memory == 400
    assert q.pick() == ["c"]


def test_zero_core_jobs_take_slots_not_cores():
    s, q = setup(cores=1, memory=10_000, zero=3)
    q.add(*(job(cpus=0, memory=10, name=f"z{i}") for i in range(5)))
    q.add(job(cpus=1, memory=10, name="one"))
    picked = q.pick()
    assert sorted(picked) == ["one", "z0", "z1", "z2"]
    assert s.zero_core_running == 3 and s.used_cores == 1
    s.release(q.jobs["z0"])
    assert s.zero_core_running == 2
    assert q.pick() == ["z3"]


def test_zero_core_jobs_still_need_memory():
    s, q = setup(cores=1, memory=100, zero=10)
    q.add(job(cpus=0, memory=60, name="a"), job(cpus=0, memory=60, name="b"))
    assert q.pick() == ["a"]


def test_default_zero_core_slots_are_eight_per_core():
    assert Capacity.detect(cores=3, memory=1000).zero_core_slots == 24
    assert Capacity.detect(cores=0.2, memory=1000).zero_core_slots == 1
    assert Capacity.detect(cores=3, memory=1000, zero_core_slots=1).zero_core_slots == 1
    detected = Capacity.detect()
    assert detected.cores >= 1 and detected.memory > 0


def test_priority_first():
    s, q = setup(cores=2)
    q.add(job(cpus=1, priority=0, name="low1"), job(cpus=1, priority=0, name="low2"))
    q.add(job(cpus=1, priority=5, name="high1"), job(cpus=1, priority=5, name="high2"))
    assert q.pick() == ["high1", "high2"]


def test_priority_beats_size():
    s, q = setup(cores=4)
    q.add(job(cpus=4, priority=0, name="big"), job(cpus=1, priority=1, name="small"))
    assert q.pick() == ["small"]


def test_larger_shapes_first_within_a_priority():
    s, q = setup(cores=4, memory=4000)
    q.add(job(cpus=1, memory=100, name="small"))
    q.add(job(cpus=3, memory=100, name="wide"))
    q.add(job(cpus=1, memory=3500, name="heavy"))
    # heavy takes 3500/4000 of the memory, wide 3/4 of the cores: heavy is the larger shape
    assert q.pick() == ["heavy", "wide"]
    assert s.waiting() == 1  # small: 4 cores are taken
    # small would fit in what is left, but the larger shapes were placed first
    s2, q2 = setup(cores=4, memory=4000)
    q2.add(job(cpus=1, memory=100, name="s1"), job(cpus=4, memory=100, name="all"))
    assert q2.pick() == ["all"]


def test_fifo_within_a_shape():
    s, q = setup(cores=10)
    q.add(job(name="third", seq=30), job(name="first", seq=10), job(name="second", seq=20))
    assert q.pick() == ["first", "second", "third"]


def test_older_shape_first_among_equal_sizes():
    s, q = setup(cores=1, memory=1000)
    # two shapes of the same size (one core of one) at the same priority: the older job goes first
    q.add(job(cpus=1, memory=100, name="newer", seq=2), job(cpus=1, memory=200, name="older", seq=1))
    assert q.pick() == ["older"]


def test_a_shape_that_does_not_fit_does_not_block_smaller_ones():
    s, q = setup(cores=4)
    q.add(job(cpus=3, name="three"))
    assert q.pick() == ["three"]
    q.add(job(cpus=2, name="two"), job(cpus=1, name="one"))
    assert q.pick() == ["one"]
    assert s.waiting() == 1


@pytest.mark.parametrize("make_stale", ["deleted", "readded", "not_ready", "reshaped"])
def test_stale_entries_are_dropped(make_stale):
    s, q = setup(cores=10)
    victim = job(cpus=1, name="victim", seq=1)
    q.add(victim, job(cpus=1, name="other", seq=2))
    if make_stale == "deleted":
        del q.jobs["victim"]
    elif make_stale == "readded":
        q.jobs["victim"] = job(cpus=1, name="victim", seq=3)  # same key, new seq: the old entry is stale
    elif make_stale == "not_ready":
        victim.state = model.BURIED
    else:
        victim.spec["cpus"] = 2  # its entry sits under the old shape
    assert q.pick() == ["other"]
    assert s.waiting() == 0
    assert s.used_cores == 1


def test_readded_job_is_picked_once_from_its_new_entry():
    s, q = setup(cores=10)
    old = job(cpus=1, name="k", seq=1)
    q.add(old)
    new = job(cpus=1, name="k", seq=5)
    q.add(new)
    assert q.pick() == ["k"]
    assert s.used_cores == 1


def test_never_fits():
    s, _ = setup(cores=4, memory=1000)
    assert s.never_fits(job(cpus=5, memory=10))
    assert s.never_fits(job(cpus=1, memory=1001))
    assert not s.never_fits(job(cpus=4, memory=1000))
    assert not s.never_fits(job(cpus=0, memory=1))


def test_a_job_that_never_fits_is_handed_out_to_be_buried():
    """It must not wait forever: pick hands it out, and the caller buries it and releases what it
    took (as JobQueue does), after which the jobs that fit still start in the same pass."""
    s, q = setup(cores=2, memory=1000)
    q.add(job(cpus=3, name="huge"), job(cpus=1, name="fine"), job(cpus=1, memory=5000, name="heavy"))
    picked, buried = [], []
    for j in s.pick(q.jobs.get, lambda j: j.state == model.READY):
        picked.append(j.key)
        if s.never_fits(j):
            buried.append(j.key)
            s.release(j)
    assert sorted(buried) == ["heavy", "huge"]
    assert sorted(picked) == ["fine", "heavy", "huge"]
    assert s.used_cores == 1 and s.used_memory == 100
    assert s.waiting() == 0


def test_push_new_keeps_each_shape_a_heap_and_fifo():
    scheduler, queue = setup(cores=1)
    # Older jobs come back one by one (a retry keeps its seq); new ones arrive in bulk, and one
    # of them older than what is queued must still go where it belongs.
    for seq in (50, 10, 30):
        queue.add(job(seq=seq, name=f"k{seq}"))
    bulk = [job(seq=seq, name=f"k{seq}") for seq in (60, 61, 5, 62)]
    queue.jobs.update((j.key, j) for j in bulk)
    scheduler.push_new(bulk)
    for heap in scheduler._groups.values():
        assert all(heap[(i - 1) // 2] <= heap[i] for i in range(1, len(heap)))
    order = []
    for _ in range(7):
        [key] = queue.pick()
        order.append(key)
        scheduler.release(queue.jobs[key])
        queue.jobs[key].state = model.RUNNING
    assert order == ["k5", "k10", "k30", "k50", "k60", "k61", "k62"]
