"""wmgr.config (defaults, the INI file, command-line overrides) and wmgr.tap (Options, makeService)."""

from __future__ import annotations

import configparser
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from wmgr.config import Config
from wmgr.errors import InvalidRequest
from wmgr.tap import Options, makeService

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "wmgr.cnf"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: Any) -> Path:
    """A private HOME and no WMGR_DATA_DIR, so defaults never depend on the machine."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WMGR_DATA_DIR", raising=False)
    return home


def write_ini(tmp_path: Path, text: str, name: str = "wmgr.cnf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


FULL_INI = """
[server]
data_dir = ~/elsewhere
interface = 0.0.0.0
port = 6000
http_port = 6001
deployment = development

[tls]
names = farm.example.org, 10.1.2.3 other.example.org
renew_check_interval = 60

[jobs]
max_cores = 2.5
max_memory = 16G
zero_core_slots = 7
output_limit = 100
kill_grace = 0.5
sample_interval = 2.5

[pman]
allow_quit = yes
"""


def full_ini_expected(home: Path) -> dict[str, Any]:
    return {
        "data_dir": home / "elsewhere",
        "interface": "0.0.0.0",
        "port": 6000,
        "http_port": 6001,
        "deployment": "development",
        "tls_names": ["farm.example.org", "10.1.2.3", "other.example.org"],
        "renew_check_interval": 60.0,
        "max_cores": 2.5,
        "max_memory": 16384,
        "zero_core_slots": 7,
        "output_limit": 100,
        "kill_grace": 0.5,
        "sample_interval": 2.5,
        "pman_allow_quit": True,
    }


# The defaults the README and the sample document (Config has more options than these).
DEFAULTS = {
    "interface": "127.0.0.1",
    "port": 5012,
    "http_port": None,
    "deployment": "production",
    "tls_names": [],
    "renew_check_interval": 86400.0,
    "max_cores": None,
    "max_memory": None,
    "zero_core_slots": None,
    "output_limit": 4096,
    "kill_grace": 5.0,
    "sample_interval": 1.0,
    "pman_allow_quit": False,
}


# -- Config -------------------------------------------------------------------------------------------


def test_defaults(home: Path) -> None:
    config = Config.load()
    assert config.data_dir == home / ".wmgr"
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == value, name


def test_data_dir_from_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("WMGR_DATA_DIR", str(tmp_path / "from-env"))
    assert Config.load().data_dir == tmp_path / "from-env"


def test_ini_overrides_the_defaults(tmp_path: Path, home: Path) -> None:
    config = Config.load(write_ini(tmp_path, FULL_INI))
    for name, value in full_ini_expected(home).items():
        assert getattr(config, name) == value, name
        assert value != (DEFAULTS.get(name) if name != "data_dir" else home / ".wmgr"), f"{name} tests nothing"


def test_overrides_beat_the_ini(tmp_path: Path, home: Path) -> None:
    config = Config.load(write_ini(tmp_path, FULL_INI), {"port": 7000, "interface": None, "http_port": 0})
    assert config.port == 7000
    assert config.http_port == 0  # 0 is a value (pick a free port), not "unset"
    assert config.interface == "0.0.0.0"  # None means "not given on the command line"


def test_empty_values_mean_auto_or_off(tmp_path: Path) -> None:
    ini = "[server]\nhttp_port =\n[jobs]\nmax_cores = auto\nmax_memory = none\nzero_core_slots =\n"
    config = Config.load(write_ini(tmp_path, ini))
    assert (config.http_port, config.max_cores, config.max_memory, config.zero_core_slots) == (None,) * 4


@pytest.mark.parametrize("text, where", [
    ("[server]\ncolour = red\n", "[server] colour"),
    ("[nonsense]\nport = 1\n", "[nonsense] port"),
    ("[jobs]\nport = 1\n", "[jobs] port"),  # a real option in the wrong section
])
def test_unknown_options_are_refused(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(f"{where} is not a wmgr option")):
        Config.load(write_ini(tmp_path, text))


@pytest.mark.parametrize("text", [
    "[server]\nport = abc\n",
    "[server]\nport = 70000\n",
    "[server]\nport = -1\n",
    "[server]\nhttp_port = 99999\n",
    "[jobs]\noutput_limit = lots\n",
    "[jobs]\noutput_limit = -1\n",
    "[jobs]\nkill_grace = -1\n",
    "[jobs]\nsample_interval = 0\n",
    "[jobs]\nmax_cores = many\n",
    "[jobs]\nmax_memory = 16\n",  # memory takes a unit
    "[jobs]\nmax_memory = 16Q\n",
    "[jobs]\nzero_core_slots = 1.5\n",
    "[pman]\nallow_quit = perhaps\n",
    "[tls]\nrenew_check_interval = daily\n",
    "not an ini file\n",  # no section header: configparser's own error, as a usage error
    "[server]\nport = 1\nport = 2\n",  # a duplicate option
])
def test_bad_values_are_refused(tmp_path: Path, text: str) -> None:
    path = write_ini(tmp_path, text)
    with pytest.raises(InvalidRequest):
        Config.load(path)
    # ... and through the command line, always as a usage error (never a traceback)
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--config", path])


def test_bad_values_name_the_file_and_option(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[server]\nport = abc\n")
    with pytest.raises(InvalidRequest, match=r"wmgr\.cnf: \[server\] port = 'abc'"):
        Config.load(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read the configuration file"):
        Config.load(str(tmp_path / "absent.cnf"))


# -- the sample, etc/wmgr.cnf -----------------------------------------------------------------------------


def test_the_sample_names_every_option_and_only_those() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SAMPLE)
    in_sample = {(section, option) for section in parser.sections() for option in parser.options(section)}
    in_config = {f.metadata["ini"][:2] for f in fields(Config) if "ini" in f.metadata}
    assert in_sample == in_config


def test_the_sample_parses_and_sets_every_field(home: Path) -> None:
    assigned: list[str] = []

    class Recording(Config):
        def __setattr__(self, name: str, value: Any) -> None:
            assigned.append(name)
            super().__setattr__(name, value)

    config = Recording()
    assigned.clear()
    config.read_ini(str(SAMPLE))
    config.check()
    assert sorted(set(assigned)) == sorted(f.name for f in fields(Config) if "ini" in f.metadata)
    # the sample documents the defaults: every value in it is the built-in one
    defaults = Config()
    for f in fields(Config):
        assert getattr(config, f.name) == getattr(defaults, f.name), f.name
    assert config.data_dir == home / ".wmgr"
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == value, name


# -- wmgr.tap ---------------------------------------------------------------------------------------------


def test_options_defaults(home: Path) -> None:
    options = Options()
    options.parseOptions([])
    assert options.config.data_dir == home / ".wmgr"
    assert options.config.port == 5012
    assert options.config.interface == "127.0.0.1"
    assert options.config.http_port is None


def test_options_override_the_ini(tmp_path: Path, home: Path) -> None:
    options = Options()
    options.parseOptions([
        "--config", write_ini(tmp_path, FULL_INI), "--data-dir", "relative/dir", "--interface", "::1",
        "--port", "0", "--http-port", "8080",
    ])
    config = options.config
    assert config.data_dir == Path.cwd() / "relative" / "dir"
    assert (config.interface, config.port, config.http_port) == ("::1", 0, 8080)
    # the rest still comes from the file
    assert config.max_memory == 16384 and config.deployment == "development"


def test_options_short_forms(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["-c", write_ini(tmp_path, "[server]\nport = 1\n"), "-d", str(tmp_path / "d"),
                          "-i", "0.0.0.0", "-p", "9"])
    assert (options.config.port, options.config.interface, options.config.data_dir) == (9, "0.0.0.0", tmp_path / "d")


@pytest.mark.parametrize("args", [
    ["--port", "abc"], ["--port", "70000"], ["--http-port", "-5"], ["--unknown"], ["positional"],
])
def test_options_refuse_bad_arguments(args: list) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


def test_help_mentions_every_option(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    for option in ("--config", "--data-dir", "--interface", "--port", "--http-port"):
        assert option in text, option
    assert "etc/wmgr.cnf" in text
    assert "WMGR_DATA_DIR" in text


def test_make_service_returns_a_multiservice_without_touching_anything(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path / "data"), "--port", "0"])
    reactor = MemoryReactor()
    service = makeService(options, reactor=reactor)
    assert isinstance(service, MultiService)
    assert not service.running
    assert service.config is options.config
    assert reactor.tcpServers == [] and reactor.sslServers == []
    assert not (tmp_path / "data").exists(), "makeService must leave the work to startService"
    assert service._settle  # the daemon's process settles its heap once started (daemon.settle_heap)


def test_the_twistd_plugin_is_found() -> None:
    from twisted.plugin import getPlugins

    import twisted.plugins

    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)}
    assert "wmgr" in makers
    assert makers["wmgr"].module == "wmgr.tap"
    assert makers["wmgr"].options is Options
