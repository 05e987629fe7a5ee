"""Filesystem helpers shared by the store and the CLI (stdlib only)."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path


def write_atomic(dest: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Write ``dest`` through a temporary file and a rename, so no reader sees a partial file.

    ``tmp`` is the temporary file's path, created exclusively (the caller keeps it on the same
    filesystem as ``dest``); by default it is a fresh ``.<name>.*`` file beside ``dest``. The
    file is created with mode 0600. Raises OSError; the temporary file is removed on failure.
    """
    if tmp is None:
        import tempfile  # here: the supervisor, which passes ``tmp``, keeps its imports few

        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.absolute().parent)
        tmp = Path(name)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_dir(path: Path) -> None:
    """Remove a directory of plain files (one level deep); what is already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        for child in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
        path.rmdir()


def remove_tree(path: Path) -> None:
    """Remove a directory tree (symlinks in it are removed, never followed).

    It is renamed to ``NAME.dead.<pid>.<ns>`` first, so it vanishes from its place at once even
    if removing its files takes a while or is interrupted (a later scan finishes the job).
    """
    if not path.exists():
        return
    dead = path
    if ".dead." not in path.name:
        dead = path.with_name(f"{path.name.partition('.')[0]}.dead.{os.getpid()}.{time.time_ns()}")
        try:
            os.rename(path, dead)
        except FileNotFoundError:
            return
        except OSError:
            dead = path
    import shutil  # here, as tempfile above

    shutil.rmtree(dead, ignore_errors=True)


def pid_alive(pid_text: str) -> bool:
    """Whether the process whose id is ``pid_text`` (as written in a file name) still runs."""
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno == errno.EPERM  # it runs, as another user
    return True
