"""End to end, rootless: a throwaway non-root user runs Debian's podman 4.3.1 with its own als
store, als-mount run as that user.

als-mount runs inside the user namespace and mount namespace of the user's podman (podman's
pause process, joined with nsenter as ``podman unshare`` joins it): there the user is root, so
the FUSE mount needs neither fusermount3 nor ``user_allow_other``, and the kernel maps the
owners als reports through the user's subuid range exactly as it maps the files of a normal
rootless pull (uid 0 is the user, uid 1000 is the subuid range's start + 999). Run in the
host's namespaces instead, als-mount is refused (``test_host_namespace_mount_refused``), and
with ``user_allow_other`` it serves layers whose owners podman's namespace cannot map, so
containers do not start (``test_host_namespace_store_with_user_allow_other``).

The user needs a /dev/fuse it may open. udev's default rules make it 0666; a machine without
udev may leave it 0600 (root only): then each of the user's commands runs in a private mount
namespace with a 0666 node for the same device bound over /dev/fuse, and nothing on the host
changes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.layers import BuiltLayer, FileSpec, make_layer
from tests.support.podman import BUSYBOX, RUN_FLAGS, e2e_marks, write_registries_conf
from tests.support.registry import RegistryServer, push_image

pytestmark = [
    *e2e_marks(),
    pytest.mark.skipif(
        shutil.which("useradd") is None or shutil.which("newuidmap") is None,
        reason="needs useradd and newuidmap (uidmap)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
APPLETS = ["sh", "cat", "ls", "stat", "echo", "head", "wc"]
UNREAD = secrets.token_bytes(2 * 1024 * 1024)  # incompressible, never read: stays in the registry
CMD = (
    "stat -c '%u:%g %a %n' /etc/motd /home/app /home/app/data.txt /data /opt/keep/new.txt; "
    "cat /etc/motd; ls /opt; ls /opt/keep"
)


def image_spec() -> dict[str, bytes | FileSpec]:
    spec: dict[str, bytes | FileSpec] = {
        "bin/busybox": FileSpec(content=Path(BUSYBOX).read_bytes(), mode=0o755),
    }
    for a in APPLETS:
        spec[f"bin/{a}"] = FileSpec(type="symlink", link="busybox")
    spec.update(
        {
            "etc/motd": b"rootless motd\n",
            "home/app": FileSpec(type="dir", uid=1000, gid=1000, mode=0o750),
            "home/app/data.txt": FileSpec(content=b"app data\n", uid=1000, gid=1000),
            "data": FileSpec(type="dir", uid=1001, gid=1002),
            "data/unread.bin": UNREAD,
            "opt/gone.txt": b"to be whited out\n",
            "opt/keep/old.txt": b"hidden by the opaque dir\n",
        }
    )
    return spec


UPPER: dict[str, bytes | FileSpec] = {
    "etc/motd": b"upper motd\n",
    "opt/.wh.gone.txt": b"",
    "opt/keep/.wh..wh..opq": b"",
    "opt/keep/new.txt": FileSpec(content=b"new\n", uid=1000, gid=1000),
}


EXPECTED = (
    "0:0 644 /etc/motd\n"
    "1000:1000 750 /home/app\n"
    "1000:1000 644 /home/app/data.txt\n"
    "1001:1002 755 /data\n"
    "1000:1000 644 /opt/keep/new.txt\n"
    "upper motd\n"
    "keep\n"
    "new.txt\n"
)


@dataclass
class User:
    """A throwaway user with a subuid/subgid range, its home and runtime dir under ``base``."""

    name: str
    uid: int
    gid: int
    base: Path
    # A 0666 FUSE device node bound over /dev/fuse in the private mount namespace of every
    # command the user runs (when the host's is not usable by others), or None.
    fuse_node: Path | None = None
    # Run the user's commands in this process's mount namespace instead (see ``holder``).
    mount_ns_of: int | None = None

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run"

    def env(self) -> dict[str, str]:
        # No login session: podman finds its runtime dir and config through these alone.
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
        }

    def argv(self, *cmd: str, fuse_node: bool = True) -> list[str]:
        prefix: list[str] = []
        if self.mount_ns_of is not None:
            prefix = ["nsenter", f"--mount=/proc/{self.mount_ns_of}/ns/mnt", "--"]
        elif fuse_node and self.fuse_node is not None:
            prefix = [
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sh",
                "-c",
                'mount --bind "$0" /dev/fuse && exec "$@"',
                str(self.fuse_node),
            ]
        return [
            *prefix,
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *cmd,
        ]

    def run(
        self, *cmd: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            self.argv(*cmd),
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} as {self.name} failed ({p.returncode}):\n{p.stderr}"
            )
        return p

    def pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == self.uid:
                        out.append(int(d))
                except OSError:
                    pass
        return out


def subid_range(path: str, name: str) -> tuple[int, int] | None:
    for line in Path(path).read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 3 and fields[0] == name:
            return int(fields[1]), int(fields[2])
    return None


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    name = "alsrl" + secrets.token_hex(4)
    # Not under pytest's tmp dir: that is root's (0700) and the user must reach its own files.
    base = Path(tempfile.mkdtemp(prefix="als-rl-", dir="/tmp"))
    base.chmod(0o755)
    created = False
    try:
        subprocess.run(
            [
                "useradd",
                "--create-home",
                "--home-dir",
                str(base / "home"),
                "--shell",
                "/bin/sh",
                "--user-group",
                name,
            ],
            check=True,
            capture_output=True,
        )
        created = True
        pw = pwd.getpwnam(name)
        if subid_range("/etc/subuid", name) is None or subid_range("/etc/subgid", name) is None:
            pytest.fail(f"useradd gave {name} no subuid/subgid range (SUB_UID_COUNT in login.defs)")
        u = User(name, pw.pw_uid, pw.pw_gid, base)
        u.runtime_dir.mkdir(mode=0o700)
        os.chown(u.runtime_dir, u.uid, u.gid)
        if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
            u.fuse_node = base / "fuse"
            dev = os.stat("/dev/fuse").st_rdev
            os.mknod(u.fuse_node, 0o666 | stat.S_IFCHR, dev)
            u.fuse_node.chmod(0o666)
        yield u
    finally:
        if created:
            uid = pwd.getpwnam(name).pw_uid
            # Everything the user runs (podman's pause process holds the namespaces that hold
            # the als mount and the containers' overlays): killed by pid, the mounts go with them.
            for _ in range(50):
                pids = User(name, uid, 0, base).pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                time.sleep(0.1)
            subprocess.run(["userdel", "--force", name], check=False, capture_output=True)
            subprocess.run(["groupdel", name], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def python_for(user: User) -> list[str]:
    """A python the user can run: this venv's interpreter when the user can execute it (a venv
    made from an interpreter in root's home cannot be), else the system's python of the same
    minor version; either finds this checkout and the venv's packages through
    ``python_env()``."""
    if user.run("test", "-x", sys.executable, check=False).returncode == 0:
        return [sys.executable]
    system = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin"
    )
    if system is None:
        pytest.skip(f"{sys.executable} is not executable by other users, no system python")
    return [system]


def python_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])}


class UserPodman:
    """The user's podman: storage.conf in ~/.config/containers, the default rootless graphroot."""

    def __init__(self, user: User, registries_conf: Path, pool: Path | None) -> None:
        self.user = user
        self.registries_conf = registries_conf
        conf = user.home / ".config" / "containers" / "storage.conf"
        text = '[storage]\ndriver = "overlay"\n'
        if pool is not None:
            text += f'\n[storage.options]\nadditionallayerstores = ["{pool}:ref"]\n'
        user.run("mkdir", "-p", str(conf.parent))
        conf.write_text(text)
        os.chown(conf, user.uid, user.gid)
        self.graphroot = user.home / ".local" / "share" / "containers" / "storage"

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        p = self.run(*args, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
        return p.stdout

    def fails(self, *args: str, timeout: float = 300) -> str:
        """podman's error output of a command that must fail."""
        p = self.run(*args, timeout=timeout)
        assert p.returncode != 0, (args, p.stdout)
        return p.stderr

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.user.argv("podman", *args),
            env={**self.user.env(), "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf)},
            cwd=self.user.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def pause_pid(self) -> int:
        self("unshare", "true")  # starts podman's pause process, which keeps the namespaces
        return int((self.user.runtime_dir / "libpod" / "tmp" / "pause.pid").read_text())

    def layer_diff_links(self) -> dict[str, str]:
        out = {}
        overlay = self.graphroot / "overlay"
        for d in overlay.iterdir() if overlay.is_dir() else []:
            diff = d / "diff"
            if diff.is_symlink():
                out[d.name] = os.readlink(diff)
        return out


def mounted_in(pid: int, path: Path) -> bool:
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    return any(
        len(f) > 4 and f[4] == str(path) for f in (line.split() for line in text.splitlines())
    )


class UserStore:
    """als-mount as the user, in the namespaces of ``nsenter_target`` (podman's pause process)
    or, when None, in the host's."""

    def __init__(
        self,
        user: User,
        root: Path,
        args: Sequence[str],
        nsenter_target: int | None,
        *,
        fuse_node: bool = True,
    ) -> None:
        self.user = user
        self.root = root
        self.pool = root / ".pool"
        self.log_path = user.base / f"{root.name}-als.log"
        self.log_path.touch()
        os.chown(self.log_path, user.uid, user.gid)
        user.run("mkdir", "-p", str(root))
        prefix: list[str] = []
        if nsenter_target is not None:
            prefix = [
                "nsenter",
                "-t",
                str(nsenter_target),
                "-U",
                "-m",
                "--preserve-credentials",
                "--",
            ]
        argv = user.argv(
            *prefix,
            *python_for(user),
            "-m",
            "als.cli.mount",
            str(root),
            "--log-level",
            "debug",
            *args,
            fuse_node=fuse_node,
        )
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                argv,
                env={**user.env(), **python_env()},
                cwd=user.home,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )

    def wait_mounted(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if mounted_in(self.proc.pid, self.pool):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"als-mount exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.pool} not mounted after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def registry(user: User) -> Iterator[RegistryServer]:
    with RegistryServer(user.base / "registry") as reg:
        yield reg


@pytest.fixture(scope="module")
def user_regconf(user: User, registry: RegistryServer) -> Path:
    path = write_registries_conf(user.base / "registries.conf", [registry.host])
    path.chmod(0o644)
    return path


@contextlib.contextmanager
def rootless_store(
    user: User, regconf: Path, name: str, *args: str
) -> Iterator[tuple[UserPodman, UserStore]]:
    """The user's podman with als at ~/NAME/.pool, als-mount in podman's namespaces."""
    root = user.home / name
    # podman refuses to start when the store's directory is missing: it exists before the
    # mount, which is made later inside podman's namespaces.
    user.run("mkdir", "-p", str(root / ".pool"))
    podman = UserPodman(user, regconf, root / ".pool")
    store = UserStore(
        user, root, ["--registries-conf", str(regconf), *args], nsenter_target=podman.pause_pid()
    )
    try:
        store.wait_mounted()
        yield podman, store
    finally:
        store.stop()
        podman("system", "reset", "--force", check=False)


def push_app(registry: RegistryServer, repo: str) -> tuple[str, list[BuiltLayer]]:
    layers = [
        make_layer(image_spec(), "estargz", prioritized=["bin/busybox", "bin/sh"]),
        make_layer(UPPER, "estargz"),
    ]
    push_image(registry, repo, "1", layers)
    return f"{registry.host}/{repo}:1", layers


def test_lazy_pull_and_run(user: User, registry: RegistryServer, user_regconf: Path) -> None:
    ref, layers = push_app(registry, "rootless/lazy")
    with rootless_store(user, user_regconf, "als", "--no-background-fetch") as (podman, store):
        mark = registry.mark()
        podman("pull", "--tls-verify=false", ref)
        # owners as in the image (root is root, not nobody), a whiteout and an opaque directory
        assert podman("run", "--rm", *RUN_FLAGS, ref, "sh", "-c", CMD) == EXPECTED
        links = podman.layer_diff_links()
        b64ref = base64.b64encode(ref.encode()).decode()
        log = store.log()
        for layer in layers:
            assert str(store.pool / b64ref / layer.digest / "diff") in links.values(), links
            assert f"layer-ready ref={ref} digest={layer.digest} format=estargz lazy=true" in log
        sent = registry.blob_bytes_sent(layers[0].digest, since=mark)
        assert sent < 0.5 * layers[0].size, (sent, layers[0].size)


def test_native_layers(user: User, registry: RegistryServer, user_regconf: Path) -> None:
    """Root in podman's user namespace is enough for native layers: complete layers are
    unpacked with the namespace's owners (on disk: the user and its subuids)."""
    ref, layers = push_app(registry, "rootless/native")
    with rootless_store(user, user_regconf, "als-native") as (podman, store):
        podman("pull", "--tls-verify=false", ref)
        assert podman("run", "--rm", *RUN_FLAGS, ref, "sh", "-c", CMD) == EXPECTED
        end = time.monotonic() + 60
        while not all(f"layer-native layer={x.digest}" in store.log() for x in layers):
            assert time.monotonic() < end, store.log()
            time.sleep(0.1)
        b64ref = base64.b64encode(ref.encode()).decode()
        # The mount exists only in podman's namespaces, and only they may use it (even the
        # host's root is refused): read the pool's diff link there.
        diff = store.pool / b64ref / layers[0].digest / "diff"
        tree = Path(podman("unshare", "readlink", str(diff)).strip())
        assert tree.is_relative_to(user.home / "als-native" / "cache"), tree
        subuid = subid_range("/etc/subuid", user.name)
        assert subuid is not None
        assert (tree / "etc/motd").stat().st_uid == user.uid
        assert (tree / "home/app/data.txt").stat().st_uid == subuid[0] + 999
        # a container started now reads the native trees, and sees the same
        assert podman("run", "--rm", *RUN_FLAGS, ref, "sh", "-c", CMD) == EXPECTED


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_podman_unshare_serves_but_does_not_pass_signals(
    user: User, registry: RegistryServer, user_regconf: Path
) -> None:
    """``podman unshare als-mount ROOT`` enters the same namespaces and serves as well, but
    podman 4.3.1 runs the command as its child and does not pass SIGTERM on: als-mount
    stays, mounted, when the ``podman unshare`` process ends. Stop als-mount itself."""
    ref, _ = push_app(registry, "rootless/unshare")
    root = user.home / "als-unshare"
    user.run("mkdir", "-p", str(root / ".pool"))
    podman = UserPodman(user, user_regconf, root / ".pool")
    pause = podman.pause_pid()
    argv = [*python_for(user), "-m", "als.cli.mount", str(root), "--no-background-fetch"]
    argv += ["--registries-conf", str(user_regconf)]
    with open(user.base / "unshare-als.log", "ab") as logf:
        proc = subprocess.Popen(
            user.argv("podman", "unshare", *argv),
            env={**user.env(), **python_env()},
            cwd=user.home,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    served: int | None = None
    try:
        end = time.monotonic() + 20
        while not mounted_in(pause, root / ".pool"):
            assert proc.poll() is None and time.monotonic() < end
            time.sleep(0.05)
        # als-mount goes on as its supervisor (a fresh interpreter, same pid) once mounted
        found = [c for c in children(proc.pid) if ALS in cmdline(c)]
        assert len(found) == 1, found
        served = found[0]
        podman("pull", "--tls-verify=false", ref)
        assert podman("run", "--rm", *RUN_FLAGS, ref, "sh", "-c", CMD) == EXPECTED
        proc.terminate()
        proc.wait(20)
        time.sleep(0.5)
        assert mounted_in(pause, root / ".pool")
        assert ALS in cmdline(served)
        os.kill(served, signal.SIGTERM)  # als-mount itself unmounts and exits
        end = time.monotonic() + 20
        while mounted_in(pause, root / ".pool"):
            assert time.monotonic() < end
            time.sleep(0.05)
        assert Path(f"/proc/{pause}").exists()  # the namespaces are still there, unmounted
    finally:
        proc.kill()
        proc.wait()
        if served is not None and ALS in cmdline(served):
            os.kill(served, signal.SIGKILL)
        podman("system", "reset", "--force", check=False)


ALS = "als.store.supervisor"  # the supervisor's command line (it re-executes itself)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("dev_fuse", ["host", "usable"])
def test_host_namespace_mount_refused(user: User, user_regconf: Path, dev_fuse: str) -> None:
    """als-mount as the user in the host's namespaces: the mount is refused."""
    if dev_fuse == "host":
        if user.fuse_node is None:
            pytest.skip("/dev/fuse is usable by every user here")
        message = "fuse: failed to open /dev/fuse: Permission denied"
    else:
        if "\nuser_allow_other" in "\n" + Path("/etc/fuse.conf").read_text():
            pytest.skip("/etc/fuse.conf has user_allow_other")
        message = (
            "fusermount3: option allow_other only allowed if 'user_allow_other' is set in"
            " /etc/fuse.conf"
        )
    root = user.home / f"als-host-{dev_fuse}"
    store = UserStore(
        user, root, ["--registries-conf", str(user_regconf)], None, fuse_node=dev_fuse == "usable"
    )
    try:
        rc = store.proc.wait(30)
    finally:
        store.stop()
    assert rc != 0
    assert message in store.log()
    assert "RuntimeError: fuse_session_mount failed" in store.log()


def test_host_namespace_store_with_user_allow_other(
    user: User, registry: RegistryServer, user_regconf: Path
) -> None:
    """What ``user_allow_other`` would give: als-mount as the user in the host's user
    namespace (through fusermount3), podman's overlay in its own. /etc/fuse.conf is not
    edited: a copy with ``user_allow_other`` is bound over it in a private mount namespace
    that als-mount and podman share."""
    conf = user.base / "fuse.conf"
    conf.write_text("user_allow_other\n")
    conf.chmod(0o644)
    binds = 'mount --bind "$0" /etc/fuse.conf'
    if user.fuse_node is not None:
        binds += f' && mount --bind "{user.fuse_node}" /dev/fuse'
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-c",
            binds + " && exec sleep 600",
            str(conf),
        ]
    )
    pause = user.runtime_dir / "libpod" / "tmp" / "pause.pid"
    try:
        end = time.monotonic() + 10
        while not mounted_in(holder.pid, Path("/etc/fuse.conf")):
            assert holder.poll() is None and time.monotonic() < end
            time.sleep(0.05)
        # podman's next command makes its namespaces afresh, from the holder's
        if pause.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pause.read_text()), 9)
        ns_user = dataclasses.replace(user, mount_ns_of=holder.pid)
        ref, layers = push_app(registry, "rootless/host-ns")
        root = user.home / "als-allow-other"
        store = UserStore(
            ns_user, root, ["--registries-conf", str(user_regconf), "--no-background-fetch"], None
        )
        podman = UserPodman(ns_user, user_regconf, store.pool)
        try:
            store.wait_mounted()
            mark = registry.mark()
            podman("pull", "--tls-verify=false", ref)  # lazy, as in podman's namespaces
            b64ref = base64.b64encode(ref.encode()).decode()
            diff = store.pool / b64ref / layers[0].digest / "diff"
            assert str(diff) in podman.layer_diff_links().values(), podman.layer_diff_links()
            sent = registry.blob_bytes_sent(layers[0].digest, since=mark)
            assert sent < 0.5 * layers[0].size, (sent, layers[0].size)

            # but the owners do not map: podman's user namespace maps only the user's own
            # uid (to 0) and its subuids, so the image's uids, seen as host uids, are nobody
            # there (the overflow id, 65534), unless one is the user's own
            def seen(uid: int, gid: int) -> str:
                return f"{0 if uid == user.uid else 65534}:{0 if gid == user.gid else 65534}"

            owners = {"etc/motd": (0, 0), "home/app": (1000, 1000), "data": (1001, 1002)}
            out = podman("unshare", "stat", "-c", "%u:%g", *(str(diff / p) for p in owners))
            assert out.split() == [seen(*ids) for ids in owners.values()]
            # and the container cannot start: its root may not write into the image's /etc
            err = podman.fails("run", "--rm", *RUN_FLAGS, ref, "sh", "-c", CMD)
            assert "Error: creating /etc/mtab symlink: permission denied" in err, err
        finally:
            store.stop()
            podman("system", "reset", "--force", check=False)
    finally:
        if pause.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pause.read_text()), 9)
        holder.kill()
        holder.wait()
