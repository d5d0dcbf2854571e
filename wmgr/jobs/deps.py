"""Dependencies between jobs, by group.

A job belongs to the groups in its `dep_grps` and waits for the groups in its `deps`: it is
dependent while any live job of those groups is not complete. Because that test is made against
the groups' current members, dependencies are "live" as in wr: a job added later to a group holds
back every job still waiting on that group (and completed dependants are re-run, see JobQueue).
A group nobody belongs to holds nothing back (wr's behaviour, its issue #316).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from wmgr.errors import InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.model import Job


class DependencyIndex:
    def __init__(self) -> None:
        self.members: dict[str, set[str]] = {}  # group -> live jobs belonging to it
        self.waiting: dict[str, set[str]] = {}  # group -> live jobs waiting for it

    def add(self, job: Job) -> None:
        for group in job.spec.get("dep_grps") or ():
            self.members.setdefault(group, set()).add(job.key)
        for group in job.spec.get("deps") or ():
            self.waiting.setdefault(group, set()).add(job.key)

    def remove(self, job: Job) -> None:
        for index, field in ((self.members, "dep_grps"), (self.waiting, "deps")):
            for group in job.spec.get(field) or ():
                keys = index.get(group)
                if keys is not None:
                    keys.discard(job.key)
                    if not keys:
                        del index[group]

    def blocked(self, job: Job, live: Mapping[str, Job]) -> bool:
        """True while some live job of a group this job waits for is not complete."""
        for group in job.spec.get("deps") or ():
            for key in self.members.get(group, ()):
                member = live.get(key)
                if member is not None and member.key != job.key and member.state != model.COMPLETE:
                    return True
        return False

    def dependants(self, job: Job) -> set[str]:
        """Live jobs waiting for any group this job belongs to."""
        keys: set[str] = set()
        for group in job.spec.get("dep_grps") or ():
            keys |= self.waiting.get(group, set())
        keys.discard(job.key)
        return keys

    def check_acyclic(self, jobs: Iterable[Job]) -> None:
        """Refuse jobs that would make groups wait for themselves, directly or through others.

        The graph has an edge g -> d for every job that belongs to g and waits for d; a cycle
        there means none of its jobs could ever run.
        """
        edges: dict[str, set[str]] = {}
        for job in jobs:
            for group in job.spec.get("dep_grps") or ():
                edges.setdefault(group, set()).update(job.spec.get("deps") or ())
        state: dict[str, int] = {}  # 1: on the current path, 2: done

        for start in list(edges):
            if state.get(start):
                continue
            stack = [(start, iter(edges.get(start, ())))]
            state[start] = 1
            path = [start]
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    path.pop()
                    state[node] = 2
                elif state.get(child) == 1:
                    cycle = path[path.index(child):] + [child]
                    raise InvalidRequest("dependency cycle: group " + " waits for ".join(repr(g) for g in cycle))
                elif not state.get(child):
                    state[child] = 1
                    path.append(child)
                    stack.append((child, iter(edges.get(child, ()))))
