"""WmgrService stops its parts in the reverse order of their start, each once the one after it
has stopped; every way to stop goes through the reactor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from wmgr.config import Config
from wmgr.daemon import WmgrService


class Part(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(self.name)
        return self.stopping


def test_parts_stop_in_reverse_order_each_after_the_next(tmp_path: Path) -> None:
    service = WmgrService(Config(data_dir=tmp_path), Clock())
    log: list[str] = []
    parts = [Part(name, log) for name in ("store", "launchers", "queue", "listener")]
    for part in parts:
        part.setServiceParent(service)
        part.running = True
    stopped = service.stopService()
    assert log == ["listener"]  # the queue waits until the listener has stopped
    parts[3].stopping.callback(None)
    assert log == ["listener", "queue"]
    parts[2].stopping.callback(None)
    parts[1].stopping.callback(None)
    assert log == ["listener", "queue", "launchers", "store"] and not stopped.called
    parts[0].stopping.callback(None)
    assert stopped.called


def test_shutdown_stops_the_reactor(tmp_path: Path) -> None:
    stops: list[bool] = []
    clock: Any = Clock()
    clock.stop = lambda: stops.append(True)
    service = WmgrService(Config(data_dir=tmp_path), clock)
    service.shutdown("pman quit")
    clock.advance(0)
    assert stops == [True]


def test_settling_the_heap_takes_what_exists_out_of_collections() -> None:
    import gc

    from wmgr.daemon import GC_THRESHOLDS, settle_heap

    thresholds = gc.get_threshold()
    try:
        made = [[i] for i in range(1000)]
        frozen = settle_heap()
        assert frozen >= len(made) and gc.get_freeze_count() == frozen
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
