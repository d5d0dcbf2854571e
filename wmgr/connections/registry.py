"""The connection registry in memory: partitions of entries, their indexes and reply caches.

No I/O and no clock of its own: every operation is given `now`, so the rules (uid-only keying,
first-insertion order, TTL, fullmatch or search) are plain functions of their inputs.

Why it is fast where the original scanned everything with a regex per entry:
- each entry carries its reply fragment, JSON-encoded once when published;
- entries are also indexed by data_type, so a lookup only walks its own type;
- a regex without metacharacters is a literal: with fullmatch that is one dict lookup;
- compiled regexes are cached (bounded), and so are whole encoded replies, per partition, until
  the partition changes or the earliest entry in the reply expires.
"""

from __future__ import annotations

import re
from json.encoder import encode_basestring_ascii as _string  # type: ignore[attr-defined]
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

ConnectionType = Union[int, str]

FULLMATCH = "fullmatch"
SEARCH = "search"
MATCH_MODES = (FULLMATCH, SEARCH)

# Characters that give a regex a meaning other than the literal text.
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
REGEX_CACHE_SIZE = 512
REPLY_CACHE_SIZE = 256


class BadPattern(ValueError):
    """A uid_regex that does not compile."""


@dataclass(frozen=True)
class Connection:
    """What a client publishes for one endpoint."""

    uid: str
    uri: str
    data_type: str
    connection_type: ConnectionType = 0


@dataclass
class Entry:
    connection: Connection
    published: float
    seq: int  # first insertion into its partition: the reply order
    fragment: bytes = b""

    def __post_init__(self) -> None:
        if not self.fragment:
            self.fragment = encode(self.connection)


def encode(connection: Connection) -> bytes:
    """The reply object of one entry: keys in the original's order, compact, properly escaped
    (byte for byte what json.dumps with separators=(",", ":") gives, which builds an encoder for
    each call: most of what encoding an entry cost)."""
    return (f'{{"uid":{_string(connection.uid)},"uri":{_string(connection.uri)},'
            f'"connection_type":{json_text(connection.connection_type)},'
            f'"data_type":{_string(connection.data_type)}}}').encode("ascii")


def json_text(value: ConnectionType) -> str:
    """A connection_type as JSON: an int (never a bool: the API refuses those) or a string."""
    return str(value) if isinstance(value, int) else _string(value)


def is_literal(pattern: str) -> bool:
    return not any(char in _REGEX_SPECIAL for char in pattern)


class PatternCache:
    """Compiled regexes, at most `size`, the oldest forgotten first."""

    def __init__(self, size: int = REGEX_CACHE_SIZE) -> None:
        self.size = size
        self._compiled: dict[str, "re.Pattern[str]"] = {}

    def get(self, pattern: str) -> "re.Pattern[str]":
        compiled = self._compiled.get(pattern)
        if compiled is None:
            try:
                compiled = re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise BadPattern(f"uid_regex {pattern!r} is not a valid regular expression: {e}") from None
            if len(self._compiled) >= self.size:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[pattern] = compiled
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def __contains__(self, pattern: str) -> bool:
        return pattern in self._compiled


@dataclass
class Partition:
    name: str
    entries: dict[str, Entry] = field(default_factory=dict)  # uid -> entry, in seq order
    by_type: dict[str, dict[str, Entry]] = field(default_factory=dict)  # data_type -> uid -> entry
    # (data_type, uid_regex) -> (encoded reply, valid until)
    replies: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)

    def changed(self) -> None:
        self.replies.clear()

    def put(self, entry: Entry) -> None:
        uid, data_type = entry.connection.uid, entry.connection.data_type
        old = self.entries.get(uid)
        self.entries[uid] = entry  # an existing key keeps its place: order is first insertion
        if old is not None and old.connection.data_type != data_type:
            self._unindex(old)
        of_type = self.by_type.setdefault(data_type, {})
        moved_in = uid not in of_type
        of_type[uid] = entry
        if moved_in and old is not None and len(of_type) > 1:
            # An entry that changed type joins its new type at its original place: rare, so a
            # re-sort of that one index is cheaper than keeping a sorted structure always.
            self.by_type[data_type] = dict(sorted(of_type.items(), key=lambda item: item[1].seq))

    def remove(self, uid: str) -> bool:
        entry = self.entries.pop(uid, None)
        if entry is None:
            return False
        self._unindex(entry)
        return True

    def _unindex(self, entry: Entry) -> None:
        data_type = entry.connection.data_type
        of_type = self.by_type.get(data_type)
        if of_type is not None:
            of_type.pop(entry.connection.uid, None)
            if not of_type:
                del self.by_type[data_type]


class Registry:
    """Every partition, keyed by name, in the order they were first published."""

    def __init__(self, ttl: float, match: str = FULLMATCH, patterns: Optional[PatternCache] = None) -> None:
        if match not in MATCH_MODES:
            raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}, not {match!r}")
        self.ttl = ttl
        self.match = match
        self.partitions: dict[str, Partition] = {}
        self.patterns = patterns or PatternCache()
        self._seq = 0

    # -- changes ---------------------------------------------------------------------------------

    def ensure(self, partition: str) -> Partition:
        part = self.partitions.get(partition)
        if part is None:
            part = self.partitions[partition] = Partition(partition)
        return part

    def publish(self, partition: str, connections: Iterable[Connection], now: float) -> list[Entry]:
        """Add or replace entries (keyed by uid alone); creates the partition even when empty.
        Returns the entries as stored, for the journal."""
        part = self.ensure(partition)
        stored = []
        changed = False
        for connection in connections:
            old = part.entries.get(connection.uid)
            if old is not None and old.connection == connection and now - old.published < self.ttl:
                # A live entry published again unchanged (clients do so every 2 s): only its
                # time moves. Cached replies stay right; they just expire a little early.
                old.published = now
                stored.append(old)
                continue
            if old is None:
                self._seq += 1
                seq = self._seq
            else:
                seq = old.seq
            entry = Entry(connection, now, seq)
            part.put(entry)
            stored.append(entry)
            changed = True
        if changed:
            part.changed()
        return stored

    def restore(self, partition: str, entry: Entry) -> None:
        """Put back an entry loaded from the journal (entries come in seq order)."""
        part = self.ensure(partition)
        part.put(entry)
        part.changed()
        self._seq = max(self._seq, entry.seq)

    def retract(self, partition: str, uids: Iterable[str]) -> tuple[list[str], list[str], bool]:
        """Remove entries by uid. Returns (removed, missing, partition_gone); the partition goes
        when its last entry does. Raises KeyError if the partition does not exist."""
        part = self.partitions[partition]
        removed, missing = [], []
        for uid in uids:
            (removed if part.remove(uid) else missing).append(uid)
        if removed:
            part.changed()
        gone = not part.entries
        if gone:
            del self.partitions[partition]
        return removed, missing, gone

    def retract_partition(self, partition: str) -> bool:
        return self.partitions.pop(partition, None) is not None

    def clear(self) -> None:
        self.partitions.clear()

    def purge(self, now: float) -> list[tuple[str, str]]:
        """Forget expired entries; returns (partition, uid) of each. A partition stays (empty)
        until it is retracted, as in the original, where lookups then answer []."""
        purged = []
        for part in self.partitions.values():
            expired = [uid for uid, entry in part.entries.items() if now - entry.published >= self.ttl]
            for uid in expired:
                part.remove(uid)
                purged.append((part.name, uid))
            if expired:
                part.changed()
        return purged

    # -- queries -----------------------------------------------------------------------------------

    def lookup(self, partition: str, uid_regex: str, data_type: str, now: float) -> bytes:
        """The encoded JSON array of live entries of `data_type` whose uid matches. Raises
        KeyError for an unknown partition and BadPattern for a regex that does not compile."""
        part = self.partitions[partition]
        key = (data_type, uid_regex)
        cached = part.replies.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        of_type = part.by_type.get(data_type)
        if not of_type:
            self.patterns.get(uid_regex)  # an invalid regex is an error even when nothing could match
            return b"[]"
        ttl = self.ttl
        if is_literal(uid_regex) and self.match == FULLMATCH:
            entry = of_type.get(uid_regex)
            if entry is None or now - entry.published >= ttl:
                return b"[]"
            return b"[" + entry.fragment + b"]"
        matches = self._matcher(uid_regex)
        oldest = None
        fragments = []
        for uid, entry in of_type.items():
            published = entry.published
            if now - published < ttl and matches(uid):
                fragments.append(entry.fragment)
                if oldest is None or published < oldest:
                    oldest = published
        reply = b"[" + b",".join(fragments) + b"]"
        if len(part.replies) >= REPLY_CACHE_SIZE:
            del part.replies[next(iter(part.replies))]
        part.replies[key] = (reply, float("inf") if oldest is None else oldest + ttl)
        return reply

    def _matcher(self, uid_regex: str) -> Callable[[str], Any]:
        if self.match == SEARCH and is_literal(uid_regex):
            return lambda uid: uid_regex in uid
        compiled = self.patterns.get(uid_regex)
        return compiled.fullmatch if self.match == FULLMATCH else compiled.search

    def live_count(self, partition: Partition, now: float) -> int:
        return sum(1 for entry in partition.entries.values() if now - entry.published < self.ttl)

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.partitions.values())
