"""``als-mount``'s command line: each flag overrides the config option of its name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from als.cli.mount import build_parser, load_config
from als.errors import ConfigError
from als.store.config import StoreConfig

EVERY_FLAG = [
    "/srv/als",
    "--registries-conf",
    "reg.conf",
    "--authfile",
    "auth.json",
    "--platform",
    "linux/arm64",
    "--lookup-timeout",
    "3",
    "--read-timeout",
    "7.5",
    "--memory-cache-mb",
    "16",
    "--cache-dir",
    "/cache",
    "--cache-limit-mb",
    "0",
    "--no-background-fetch",
    "--metrics-listen",
    "127.0.0.1:9100",
    "--log-level",
    "debug",
    "--debug-fuse",
]


def test_every_flag_names_a_config_option() -> None:
    dests = set(vars(build_parser().parse_args(["/srv/als"])))
    options = {f.name for f in dataclasses.fields(StoreConfig)}
    # --config, and the process-level flags (how als-mount runs, not what the store does)
    assert dests - options == {"config", "supervise", "takeover"}


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "als.toml"
    conf.write_text("lookup_timeout = 1\nread_timeout = 9\nnet_threads = 3\n")
    cfg = load_config(build_parser().parse_args([*EVERY_FLAG, "--config", str(conf)]))
    assert cfg == StoreConfig(
        root=Path("/srv/als"),
        registries_conf="reg.conf",
        authfile="auth.json",
        platform="linux/arm64",
        lookup_timeout=3.0,
        read_timeout=7.5,
        net_threads=3,
        memory_cache_mb=16,
        cache_dir="/cache",
        cache_limit_mb=0,
        background_fetch=False,
        metrics_listen="127.0.0.1:9100",
        log_level="debug",
        debug_fuse=True,
    )


def test_flags_not_given_leave_the_config_file_alone(tmp_path: Path) -> None:
    conf = tmp_path / "als.toml"
    conf.write_text("lookup_timeout = 1\nbackground_fetch = false\ndebug_fuse = true\n")
    cfg = load_config(build_parser().parse_args(["/srv/als", "--config", str(conf)]))
    assert cfg == StoreConfig.load(str(conf), {"root": "/srv/als"})
    assert (cfg.lookup_timeout, cfg.background_fetch, cfg.debug_fuse) == (1.0, False, True)


def test_a_bad_flag_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="lookup_timeout must be a non-negative number"):
        load_config(build_parser().parse_args(["/srv/als", "--lookup-timeout=-1"]))
