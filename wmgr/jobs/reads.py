"""The queue's read side: finding jobs by key or rep group, live ones from memory and completed
ones from the store, and wr's limit=N grouping over both. Nothing here changes a job."""

from __future__ import annotations

from typing import Any, Optional

from wmgr.jobs import model
from wmgr.jobs.journal import Journal
from wmgr.jobs.model import Job


def matches_state(job: Job, state: str) -> bool:
    if state == model.DELETABLE:
        return job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE
    if state == model.RUNNING:
        return job.state in model.ACTIVE_STATES
    return job.state == state


def incomplete(live: dict[str, Job], state: Optional[str] = None) -> list[Job]:
    if state is None:
        return [job for job in live.values() if job.state != model.COMPLETE]
    return [job for job in live.values() if matches_state(job, state)]


async def status_of(live: dict[str, Job], by_rep_grp: dict[str, dict[str, None]], journal: Journal,
                    ids: list[str], state: Optional[str] = None, search: bool = False,
                    limit: int = 0) -> list[tuple[Job, int]]:
    """Jobs by key or rep group, completed ones included. A 32-hex id is tried as a key first,
    then as a rep group; `state` filters rep-group matches only (as wr does). Grouped as wr's
    limit=N groups (see model.grouped) when limit > 0: completed jobs are then counted from the
    store's counters, never scanned."""
    keys = [i for i in ids if model.is_key(i)]
    want_history = state in (None, model.COMPLETE)
    # Live matches are taken before the store is read: a job whose completion commits while the
    # read runs leaves `live` then, and would otherwise be found in neither place.
    from_live: list[tuple[str, Optional[Job], list[Job]]] = []
    for ident in ids:
        job = live.get(ident) if model.is_key(ident) else None
        members: list[Job] = []
        if job is None:
            groups = [g for g in by_rep_grp if ident in g] if search else [ident] if ident in by_rep_grp else []
            members = [live[key] for group in groups for key in by_rep_grp[group]]
        from_live.append((ident, job, members))
    history = await journal.history(keys, ids, search, limit, want_history)
    found: dict[str, Job] = {}
    for ident, job, members in from_live:
        if job is None and model.is_key(ident):
            job = history["keys"].get(ident)
        if job is not None:
            found[job.key] = job
            continue
        for job in members:
            if state is None or matches_state(job, state):
                found.setdefault(job.key, job)
    found_live = list(found.values())
    if not limit:
        stored = [job for job in history["jobs"] if job.key not in found]
        return [(job, 0) for job in found_live + stored]
    return merge_groups(found_live, history["groups"], found, limit)


def merge_groups(live: list[Job], stored_groups: list[tuple[tuple[str, int, str], int, list[Job]]],
                 seen: dict[str, Job], limit: int) -> list[tuple[Job, int]]:
    """wr's limit grouping over live jobs and the store's counted groups of completed ones."""
    groups: dict[tuple[str, int, str], list[Any]] = {}
    for job, similar in model.grouped(live, limit):
        entry = groups.setdefault((job.state, job.exitcode, job.fail_reason), [[], 0])
        entry[0].append(job)
        entry[1] += similar
    for group_key, count, examples in stored_groups:
        entry = groups.setdefault(group_key, [[], 0])
        fresh = [job for job in examples if job.key not in seen]
        room = max(0, limit - len(entry[0]))
        entry[0].extend(fresh[:room])
        entry[1] += count - len(examples) + max(0, len(fresh) - room)
    result: list[tuple[Job, int]] = []
    for kept, hidden in groups.values():
        if kept:
            result.extend((job, 0) for job in kept[:-1])
            result.append((kept[-1], hidden))
    return result
