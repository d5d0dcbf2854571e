"""The connection registry's rules (wmgr.connections) under a Clock, with the store's SQL run
synchronously on an in-memory SQLite database: ordering, replacement, TTL and purging,
partitions appearing and disappearing, regex rules, caches, and what survives a restart."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from wmgr.connections import registry as reg
from wmgr.connections.registry import Connection, Registry
from wmgr.connections.service import ConnectionService, purge_interval
from wmgr.errors import InvalidRequest, NotFound
from wmgr.store import migrate


class FakeStore:
    """The store's interface over one in-memory connection; operations run at once."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        migrate(self.conn)
        self.writes = 0
        self.broken = False

    def write(self, operation: Any, durable: bool = True) -> Any:
        if self.broken:
            return fail(RuntimeError("disk on fire"))
        self.writes += 1
        return succeed(operation(self.conn))

    def read(self, operation: Any) -> Any:
        return succeed(operation(self.conn))

    def rows(self) -> list[tuple]:
        return self.conn.execute("SELECT partition, uid, uri, data_type FROM conn_entries ORDER BY seq").fetchall()


def dro(i: int, data_type: str = "TPSet", uri: str = "") -> Connection:
    return Connection(f"DRO-{i:03d}-tp_to_trigger", uri or f"tcp://192.168.1.100:{1234 + i}", data_type, 0)


def uids(reply: bytes) -> list[str]:
    return [item["uid"] for item in json.loads(reply)]


# Every Clock made here; run() lets each turn once, as the reactor's next iteration would, which
# is when the service hands its batch of writes to the store.
_clocks: list[Clock] = []


def make(ttl: float = 10.0, match: str = reg.FULLMATCH, store: Any = None) -> tuple[ConnectionService, Clock, FakeStore]:
    clock = Clock()
    clock.advance(1_000_000)
    _clocks[:] = [clock]
    store = store or FakeStore()
    return ConnectionService(store, clock, ttl=ttl, match=match), clock, store


def run(coroutine: Any) -> Any:
    """Run a coroutine that completes synchronously (the fake store never waits)."""
    from twisted.internet.defer import ensureDeferred

    results: list[Any] = []
    ensureDeferred(coroutine).addBoth(results.append)
    for clock in _clocks:
        clock.advance(0)
    assert results, "the coroutine did not complete"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


# -- shapes and order ------------------------------------------------------------------------------


def test_reply_is_compact_in_the_original_key_order_and_first_insertion_order() -> None:
    service, _, _ = make()
    run(service.publish("ccTest", [dro(1), dro(0)]))
    reply = service.lookup("ccTest", "DRO.*", "TPSet")
    assert reply == (b'[{"uid":"DRO-001-tp_to_trigger","uri":"tcp://192.168.1.100:1235","connection_type":0,'
                     b'"data_type":"TPSet"},{"uid":"DRO-000-tp_to_trigger","uri":"tcp://192.168.1.100:1234",'
                     b'"connection_type":0,"data_type":"TPSet"}]')


def test_republishing_replaces_by_uid_keeping_its_place_even_with_another_data_type() -> None:
    service, _, _ = make()
    run(service.publish("p", [dro(0), dro(1), dro(2)]))
    run(service.publish("p", [dro(0, "Other", "tcp://new:1")]))
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == ["DRO-001-tp_to_trigger", "DRO-002-tp_to_trigger"]
    assert json.loads(service.lookup("p", "DRO.*", "Other")) == [
        {"uid": "DRO-000-tp_to_trigger", "uri": "tcp://new:1", "connection_type": 0, "data_type": "Other"}]
    # Back to TPSet: it takes its first-insertion place again, before 001.
    run(service.publish("p", [dro(0)]))
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [f"DRO-00{i}-tp_to_trigger" for i in range(3)]
    assert service.lookup("p", "DRO.*", "Other") == b"[]"


def test_retract_then_publish_moves_an_entry_to_the_end() -> None:
    service, _, _ = make()
    run(service.publish("p", [dro(0), dro(1)]))
    run(service.retract("p", [dro(0).uid]))
    run(service.publish("p", [dro(0)]))
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == ["DRO-001-tp_to_trigger", "DRO-000-tp_to_trigger"]


def test_output_is_always_valid_json() -> None:
    service, _, _ = make()
    nasty = Connection('a"b\\c\n', 'tcp://"x"', "T\"", "kSendRecv")
    run(service.publish("p", [nasty]))
    assert json.loads(service.lookup("p", "(?s).*", 'T"')) == [
        {"uid": 'a"b\\c\n', "uri": 'tcp://"x"', "connection_type": "kSendRecv", "data_type": 'T"'}]


# -- partitions ---------------------------------------------------------------------------------------


def test_a_partition_exists_from_its_first_publish_even_empty_until_retracted_or_emptied() -> None:
    service, _, _ = make()
    with pytest.raises(NotFound):
        service.lookup("p", "DRO.*", "TPSet")
    run(service.publish("p", []))
    assert service.lookup("p", "DRO.*", "TPSet") == b"[]"
    run(service.publish("p", [dro(0), dro(1)]))
    run(service.retract("p", [dro(0).uid]))
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(1).uid]
    run(service.retract("p", [dro(1).uid]))
    with pytest.raises(NotFound):
        service.lookup("p", "DRO.*", "TPSet")
    with pytest.raises(NotFound):
        run(service.retract("p", [dro(1).uid]))


def test_retract_removes_the_present_ids_then_reports_the_missing_ones() -> None:
    service, _, store = make()
    run(service.publish("p", [dro(0), dro(1)]))
    with pytest.raises(NotFound, match="DRO-009"):
        run(service.retract("p", [dro(0).uid, dro(9).uid]))
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(1).uid]
    assert [row[1] for row in store.rows()] == [dro(1).uid]


def test_retract_partition_and_reset() -> None:
    service, _, store = make()
    run(service.publish("a", [dro(0)]))
    run(service.publish("b", [dro(1)]))
    run(service.retract_partition("a"))
    with pytest.raises(NotFound):
        run(service.retract_partition("a"))
    assert [p["partition"] for p in service.partitions()] == ["b"]
    run(service.reset())
    assert service.partitions() == [] and store.rows() == []
    assert service.stats.publishes == 0


# -- TTL --------------------------------------------------------------------------------------------------


def test_entries_expire_ttl_seconds_after_their_last_publish() -> None:
    service, clock, _ = make(ttl=10)
    run(service.publish("p", [dro(0), dro(1)]))
    clock.advance(6)
    run(service.publish("p", [dro(1)]))  # republished unchanged: only its time moves
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(0).uid, dro(1).uid]
    clock.advance(4)  # dro(0) is 10 s old: expired
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(1).uid]
    assert service.lookup("p", dro(0).uid, "TPSet") == b"[]"
    clock.advance(6)
    assert service.lookup("p", "DRO.*", "TPSet") == b"[]"
    assert service.lookup("p", dro(1).uid, "TPSet") == b"[]"
    assert service.partitions() == [{"partition": "p", "entries": 0}]
    run(service.publish("p", [dro(0)]))  # an expired entry published again is live again
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(0).uid]


def test_the_purge_timer_forgets_expired_entries_in_memory_and_in_the_store() -> None:
    service, clock, store = make(ttl=4)
    service.startService()
    try:
        run(service.publish("p", [dro(0)]))
        clock.advance(2)
        run(service.publish("p", [dro(1)]))
        clock.advance(purge_interval(4))  # dro(0) is 4 s old now
        assert list(service.registry.partitions["p"].entries) == [dro(1).uid]
        assert [row[1] for row in store.rows()] == [dro(1).uid]
        store.broken = True  # a failing purge must not stop the timer
        clock.advance(purge_interval(4))
        store.broken = False
        clock.advance(purge_interval(4))
        assert service.registry.partitions["p"].entries == {}
        assert store.rows() == []
        assert service.lookup("p", "DRO.*", "TPSet") == b"[]"  # the partition stays, as in the original
    finally:
        service.stopService()


# -- matching ------------------------------------------------------------------------------------------------


def test_fullmatch_by_default_and_data_type_equality() -> None:
    service, _, _ = make()
    run(service.publish("p", [dro(0), dro(1), Connection("xDRO-002-tp", "tcp://h:1", "TPSet")]))
    assert uids(service.lookup("p", "DRO", "TPSet")) == []
    assert uids(service.lookup("p", "DRO-00[01].*", "TPSet")) == [dro(0).uid, dro(1).uid]
    assert uids(service.lookup("p", ".*DRO.*", "TPSet")) == [dro(0).uid, dro(1).uid, "xDRO-002-tp"]
    assert service.lookup("p", "DRO.*", "tpset") == b"[]"


def test_search_mode_matches_anywhere_as_v4_clients_expect() -> None:
    service, _, _ = make(match=reg.SEARCH)
    run(service.publish("p", [dro(0), Connection("xDRO-002-tp", "tcp://h:1", "TPSet")]))
    assert uids(service.lookup("p", "DRO", "TPSet")) == [dro(0).uid, "xDRO-002-tp"]
    assert uids(service.lookup("p", "002", "TPSet")) == ["xDRO-002-tp"]
    assert uids(service.lookup("p", "^DRO", "TPSet")) == [dro(0).uid]


def test_an_exact_uid_is_found_without_a_scan_and_a_dot_stays_a_wildcard() -> None:
    service, _, _ = make()
    run(service.publish("p", [Connection("app.out", "tcp://h:1", "T"), Connection("appXout", "tcp://h:2", "T")]))
    part = service.registry.partitions["p"]
    part.by_type["T"] = _NoIteration(part.by_type["T"])
    assert uids(service.lookup("p", "appXout", "T")) == ["appXout"]  # a literal: a dict lookup only
    part.by_type["T"] = dict(part.by_type["T"])
    assert uids(service.lookup("p", "app.out", "T")) == ["app.out", "appXout"]


class _NoIteration(dict):
    def items(self) -> Any:
        raise AssertionError("a literal uid must not scan the partition")

    def __iter__(self) -> Any:
        raise AssertionError("a literal uid must not scan the partition")


def test_an_invalid_regex_is_refused_even_when_nothing_could_match() -> None:
    service, _, _ = make()
    run(service.publish("p", [dro(0)]))
    for data_type in ("TPSet", "Nothing"):
        with pytest.raises(InvalidRequest, match="not a valid regular expression"):
            service.lookup("p", "DRO(", data_type)
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(0).uid]


def test_compiled_regexes_are_cached_and_bounded() -> None:
    cache = reg.PatternCache(size=3)
    first = cache.get("a.*")
    assert cache.get("a.*") is first
    for pattern in ("b", "c", "d"):
        cache.get(pattern)
    assert len(cache) == 3
    assert "a.*" not in cache and "d" in cache  # the oldest is forgotten first


# -- reply caches --------------------------------------------------------------------------------------------


def test_encoded_replies_are_reused_until_the_partition_changes() -> None:
    service, clock, _ = make(ttl=10)
    run(service.publish("p", [dro(0), dro(1)]))
    first = service.lookup("p", "DRO.*", "TPSet")
    assert service.lookup("p", "DRO.*", "TPSet") is first
    run(service.publish("p", [dro(1)]))  # unchanged and live: the cache stays
    assert service.lookup("p", "DRO.*", "TPSet") is first
    run(service.publish("p", [dro(1, uri="tcp://moved:9")]))
    assert json.loads(service.lookup("p", "DRO.*", "TPSet"))[1]["uri"] == "tcp://moved:9"
    run(service.publish("p", [dro(2)]))
    assert uids(service.lookup("p", "DRO.*", "TPSet"))[-1] == dro(2).uid
    run(service.retract("p", [dro(2).uid]))
    assert dro(2).uid not in uids(service.lookup("p", "DRO.*", "TPSet"))
    clock.advance(9)
    run(service.publish("p", [dro(1)]))
    clock.advance(1)  # dro(0) expires: a cached reply containing it must not be served
    assert uids(service.lookup("p", "DRO.*", "TPSet")) == [dro(1).uid]


def test_other_partitions_and_types_do_not_see_each_other() -> None:
    service, _, _ = make()
    run(service.publish("a", [dro(0)]))
    run(service.publish("b", [dro(1), dro(2, "Other")]))
    assert uids(service.lookup("a", "DRO.*", "TPSet")) == [dro(0).uid]
    assert uids(service.lookup("b", "DRO.*", "TPSet")) == [dro(1).uid]
    assert [p["partition"] for p in service.partitions()] == ["a", "b"]


# -- durability -----------------------------------------------------------------------------------------------


def test_a_new_service_on_the_same_store_gets_back_what_has_not_expired() -> None:
    service, clock, store = make(ttl=10)
    run(service.publish("p", [dro(0), dro(1)]))
    run(service.publish("empty", []))
    clock.advance(5)
    run(service.publish("p", [dro(2), dro(0, "Other")]))
    run(service.publish("q", [dro(3)]))
    run(service.retract("q", [dro(3).uid]))
    clock.advance(6)  # dro(1) expired
    again = ConnectionService(store, clock, ttl=10)
    assert run(again.load()) == 2
    assert [p["partition"] for p in again.partitions()] == ["p", "empty"]
    assert uids(again.lookup("p", "DRO.*", "TPSet")) == [dro(2).uid]
    assert uids(again.lookup("p", "DRO.*", "Other")) == [dro(0).uid]
    run(again.publish("p", [dro(4)]))  # sequence numbers carry on: order is kept
    assert uids(again.lookup("p", "DRO.*", "TPSet")) == [dro(2).uid, dro(4).uid]


def test_connection_type_comes_back_with_its_json_type() -> None:
    service, clock, store = make()
    run(service.publish("p", [Connection("a", "u", "T", 1), Connection("b", "u", "T", "kPubSub")]))
    again = ConnectionService(store, clock)
    run(again.load())
    assert [item["connection_type"] for item in json.loads(again.lookup("p", ".*", "T"))] == [1, "kPubSub"]


def test_stats_count_publishes_lookups_and_sizes() -> None:
    service, _, _ = make()
    run(service.publish("p", [dro(0), dro(1)]))
    service.lookup("p", "DRO.*", "TPSet")
    stats = service.stats
    assert (stats.publishes, stats.lookups, stats.max_partitions, stats.max_entries) == (1, 1, 1, {"p": 2})
    service.reset_stats()
    assert service.stats.publishes == 0


def test_an_unknown_match_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        Registry(10, match="anywhere")


def test_the_connections_options_are_read_and_checked(tmp_path: Any) -> None:
    from wmgr.config import Config

    path = tmp_path / "wmgr.cnf"
    path.write_text("[connections]\nttl = 2.5\nmatch = search\nopen = yes\nmax_body = 1000\nmax_regex = 10\n")
    config = Config.load(str(path))
    assert (config.connections_ttl, config.connections_match, config.connections_open,
            config.connections_max_body, config.connections_max_regex) == (2.5, "search", True, 1000, 10)
    for bad in ("ttl = 0", "match = anywhere", "open = maybe", "max_body = -1"):
        path.write_text(f"[connections]\n{bad}\n")
        with pytest.raises(InvalidRequest):
            Config.load(str(path))


def test_a_purge_with_nothing_expired_leaves_the_store_alone() -> None:
    service, clock, store = make(ttl=10)
    run(service.purge())  # the first one clears what a restart left behind
    run(service.publish("p", [dro(0)]))
    writes = store.writes
    run(service.purge())
    assert store.writes == writes
    clock.advance(10)
    run(service.purge())
    assert store.writes == writes + 1 and store.rows() == []


def test_writes_of_one_reactor_iteration_go_to_the_store_as_one_operation() -> None:
    from twisted.internet.defer import ensureDeferred

    service, clock, store = make()
    done: list[Any] = []
    for i in range(3):
        ensureDeferred(service.publish("p", [dro(i)])).addBoth(done.append)
    ensureDeferred(service.retract("p", [dro(0).uid])).addBoth(done.append)
    assert done == [] and store.writes == 0  # not answered before it is committed
    clock.advance(0)
    assert done == [None] * 4 and store.writes == 1
    assert [row[1] for row in store.rows()] == [dro(1).uid, dro(2).uid]
    store.broken = True
    ensureDeferred(service.publish("p", [dro(5)])).addBoth(done.append)
    clock.advance(0)
    assert "disk on fire" in str(done[-1].value)


@pytest.mark.parametrize("text", ["", "DRO-000", 'é"\\\n\t\u2028\U0001F600', "</script>", "\x00\x1f\x7f", "\ud800"])
@pytest.mark.parametrize("connection_type", [0, -5, 2 ** 70, "", 'x"é'])
def test_an_entry_is_encoded_as_json_dumps_would_encode_it(text: str, connection_type: Any) -> None:
    connection = Connection(text, text + "u", "T" + text, connection_type)
    expected = json.dumps({"uid": connection.uid, "uri": connection.uri, "connection_type": connection_type,
                           "data_type": connection.data_type}, separators=(",", ":")).encode()
    assert reg.encode(connection) == expected
    assert json.loads(reg.json_text(connection_type)) == connection_type
