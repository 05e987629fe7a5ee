"""Store configuration: every option has a default; a TOML file and flags override them."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from als.errors import ConfigError
from als.overlay import OPAQUE_XATTRS, TRUSTED_OPAQUE_XATTR, USER_OPAQUE_XATTR
from als.paths import DEFAULT_ROOT, pool_dir


@dataclass
class StoreConfig:
    root: Path = Path(DEFAULT_ROOT)
    # Registry access
    registries_conf: str | None = None  # default: /etc/containers/registries.conf (+ .d)
    authfile: str | None = None  # default: the usual podman/docker auth files
    platform: str | None = None  # os/arch[/variant]; default: this host
    # Token realms on another host than the registry that may receive the registry's
    # credentials: "registry-host=realm-host" pairs, "*" for any (docs/registries.md).
    auth_realm_hosts: str = "registry-1.docker.io=auth.docker.io"
    # How long a podman lookup may take before the store answers ENOENT (podman then pulls
    # normally). podman asks the store about every layer of every pull: keep it short.
    lookup_timeout: float = 15.0
    # How long a failed lookup is remembered (ENOENT at once) before the registry is asked again.
    negative_ttl: float = 10.0
    # How long a resolved image (manifest + config) is reused for further lookups.
    manifest_ttl: float = 120.0
    # A read of file content waits at most this long for the registry, then answers EIO.
    read_timeout: float = 60.0
    connect_timeout: float = 5.0
    # Parallelism
    net_threads: int = 8
    cpu_threads: int = 2
    disk_threads: int = 4
    # Bytes of decompressed, verified chunks kept in memory while reads go on; emptied (and the
    # memory given back) after memory_release_s seconds without chunk traffic (0: never).
    memory_cache_mb: int = 32
    memory_release_s: float = 10.0
    # Supervised (docs/reliability.md): a server that answers no ping for this long is taken
    # for hung, killed and replaced; 0: never.
    watchdog_s: float = 60.0
    # The disk cache (docs/cache.md): default ROOT/cache; 0 MiB means no limit.
    cache_dir: str | None = None
    cache_limit_mb: int = 10240
    # Fetch the prioritized files (eStargz landmark, learned profile) when a layer is resolved.
    prefetch: bool = True
    # Then download the rest of each layer at low priority, paused while readers wait.
    background_fetch: bool = True
    background_delay: float = 2.0  # seconds after a layer is resolved
    background_concurrency: int = 2  # downloads at once, over all layers
    background_range_kb: int = 4096  # size of one background range request
    background_bandwidth_mb: float = 0.0  # MB/s per download; 0 means unlimited
    # Seconds after a layer's first open during which opened files are recorded (learned
    # prefetch); 0 disables learning.
    profile_window: float = 30.0
    # Control socket for `als status` (default ROOT/.als.sock) and an optional metrics listener
    # ("HOST:PORT" or "unix:PATH") serving /metrics and /status.
    status_socket: str | None = None
    metrics_listen: str | None = None
    # A read that has to go to the registry also fetches this much of the blob after it (KiB,
    # in the background, verified like any other read): readers that walk files in blob order
    # (tar, find | xargs cat, a program's start-up) then find their next files in memory.
    # 0 disables read-ahead.
    readahead_kb: int = 8192
    # Nearby compressed ranges closer than this are fetched in one request.
    coalesce_gap: int = 64 * 1024
    # Once a layer's whole blob is in the cache and verified, unpack it into a directory of
    # the cache and answer the pool's `diff` with a symlink to it (docs/cache.md): overlay
    # mounts made afterwards read the local filesystem, not FUSE. Needs root.
    native_layers: bool = True
    # The xattr that marks an opaque directory for overlayfs: "trusted" (rootful overlay),
    # "user" (overlay mounted with userxattr, rootless), "both", or "auto" (trusted when
    # als-mount runs as root in the initial user namespace, else user), in the FUSE view and
    # in native trees alike.
    opaque_xattr: str = "auto"
    # Zero-message open: answer the kernel's first open and opendir with ENOSYS, after which it
    # opens files and directories without asking the store, and keeps their pages and listings
    # cached (no open, release, opendir or releasedir requests at all). Takes effect only with
    # the pyfuse3 that scripts/build-pyfuse3 builds (it hands read and readdir the inode); with
    # a stock pyfuse3 the store opens everything itself, as when this is off.
    zero_message_open: bool = True
    # Kernel cache timeouts (seconds): layer contents never change.
    layer_ttl: float = 3600.0
    store_ttl: float = 1.0
    log_level: str = "info"
    debug_fuse: bool = False

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any] | None = None) -> StoreConfig:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as f:
                    values = tomllib.load(f)
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path}: {exc}") from exc
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        cfg = cls()
        for name, raw in values.items():
            setattr(cfg, name, _check(name, getattr(cfg, name), raw))
        if cfg.opaque_xattr not in _OPAQUE_CHOICES:
            raise ConfigError(
                f"config option opaque_xattr must be one of {', '.join(_OPAQUE_CHOICES)}"
            )
        return cfg

    @property
    def pool(self) -> Path:
        return pool_dir(self.root)

    @property
    def opaque_xattrs(self) -> tuple[str, ...]:
        """The xattr names an opaque directory answers with ``y``."""
        mode = self.opaque_xattr
        if mode == "auto":
            mode = "trusted" if host_root() else "user"
        if mode == "both":
            return OPAQUE_XATTRS
        return (TRUSTED_OPAQUE_XATTR,) if mode == "trusted" else (USER_OPAQUE_XATTR,)


_OPAQUE_CHOICES = ("auto", "trusted", "user", "both")

INITIAL_UID_MAP = ["0", "0", "4294967295"]


def host_root(uid_map: str = "/proc/self/uid_map") -> bool:
    """True when this process is root in the initial user namespace. Root inside a user
    namespace (als-mount run in rootless podman's, as ``podman unshare`` does) is not: its
    overlay mounts use ``userxattr``, so opaque directories need ``user.overlay.opaque``."""
    if os.geteuid() != 0:
        return False
    try:
        with open(uid_map, encoding="ascii") as f:
            return f.read().split() == INITIAL_UID_MAP
    except OSError:
        return True  # no /proc: nothing tells of a user namespace


def _check(name: str, default: object, value: object) -> object:
    """Validate one option against the type of its default."""
    if isinstance(default, Path):
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"config option {name} must be a path")
        return Path(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config option {name} must be true or false")
        return value
    if isinstance(default, (int, float)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"config option {name} must be a non-negative number")
        return type(default)(value)
    if (default is None or isinstance(default, str)) and not isinstance(value, str):
        raise ConfigError(f"config option {name} must be a string")
    return value
