"""Writing a run's files so that a kill, a full disk or a read-only folder never costs more than the
step being written, and never goes unnoticed.

* Every file the trainer writes whole (checkpoints, ``OUT/final``) is written under a temporary
  name, flushed and fsynced, renamed over the target, and the folder fsynced: the target is
  either the old file or the complete new one.
* Temporary names say who owns them: ``<target>.tmp.<host>.<pid>``. A kill leaves such a file
  behind; :func:`remove_stale` deletes those whose owner is not alive on this host (run at the
  start of every run).
* :func:`check_writable` creates, fsyncs and removes a probe file in ``--out`` before anything
  is loaded, so a read-only or full disk is reported in seconds rather than after the models.
* A failed write (:class:`StorageError`) removes what it had written and says what failed in
  words: "no space left on device writing OUT/checkpoints/step-00000400.pt".
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
from typing import Callable, Optional

_HOST = socket.gethostname()
_TMP = re.compile(r"^(?P<target>.+)\.tmp\.(?P<host>[^/]+)\.(?P<pid>\d+)$")
_LEGACY_TMP = re.compile(r"^(?P<target>.+\.pt)\.tmp\.(?P<pid>\d+)$")  # before the host was part of the name

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class StorageError(OSError):
    """A file of the run could not be written; the message says which and why, in words."""

    def __init__(self, err: Optional[int], message: str):
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def reason(e: OSError) -> str:
    """What an OSError means, in words ("no space left on device")."""
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    return (e.strerror or str(e)).lower() if e.errno else str(e)


def write_error(path: str, e: OSError) -> StorageError:
    return StorageError(e.errno, f"{reason(e)} writing {path}")


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e`` (torch.save wraps a failed write of the file in a RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def temp_path(target: str) -> str:
    """The temporary name this process writes ``target`` under."""
    return f"{target}.tmp.{_HOST}.{os.getpid()}"


def open_for_write(path: str, mode: str = "wb"):
    """``open`` for every write of the run (one place, so tests can inject a failing disk)."""
    return open(path, mode)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def atomic_write(path: str, write: Callable) -> None:
    """``write(f)`` into a temporary file, then rename it to ``path`` (see the module docstring).

    On any failure the temporary file is removed and the old ``path`` is untouched; a failed
    write of the disk raises StorageError.
    """
    tmp = temp_path(path)
    try:
        with open_for_write(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        _remove(tmp)
        os_err = _os_error(e)
        if os_err is not None and not isinstance(e, StorageError):
            raise write_error(path, os_err) from None
        raise


def atomic_dir(path: str, write: Callable[[str], None]) -> None:
    """``write(folder)`` fills a temporary folder, which then replaces the folder ``path``.

    The old folder is removed only once the new one is complete (between the two renames a
    kill leaves ``path`` absent and the complete new folder under its temporary name, which the
    next start removes; --resume then writes it again).
    """
    tmp = temp_path(path)
    _remove(tmp)
    try:
        write(tmp)
    except BaseException as e:
        _remove(tmp)
        os_err = _os_error(e)
        if os_err is not None and not isinstance(e, StorageError):
            raise write_error(path, os_err) from None
        raise
    publish_dir(tmp, path)


def publish_dir(tmp: str, path: str) -> None:
    """The complete folder ``tmp`` (its files fsynced here) replaces the folder ``path``, as
    :func:`atomic_dir` does; on failure ``tmp`` is removed and the old ``path`` is kept."""
    try:
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if os.path.exists(path):
            old = f"{path}.old.tmp.{_HOST}.{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        if old:
            _remove(old)
    except BaseException as e:
        _remove(tmp)
        os_err = _os_error(e)
        if os_err is not None and not isinstance(e, StorageError):
            raise write_error(path, os_err) from None
        raise


def remove_path(path: str) -> None:
    """Remove a file or a folder (its contents included); nothing when it is not there."""
    _remove(path)


def append_line(path: str, line: str) -> None:
    """Append one line; a failed write is cut off again, so the file never ends in half a line."""
    try:
        with open_for_write(path, "ab") as f:
            size = f.tell()
            try:
                f.write(line.encode("utf-8"))
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise
    except OSError as e:
        raise write_error(path, e) from None


def check_writable(folder: str, flag: str = "--out") -> None:
    """Create ``folder`` if needed and write, fsync and remove a probe file in it."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise StorageError(e.errno, f"{flag} {folder}: cannot create the folder: {reason(e)}") from None
    probe = temp_path(os.path.join(folder, ".write-probe"))
    try:
        with open_for_write(probe) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(e.errno, f"{flag} {folder} is not writable: {reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


# ---------------------------------------------------------------------------------------------
# Temporary files of killed writes


def _start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, written: float) -> bool:
    """Whether process ``pid`` of this host may still be writing a file last modified at
    ``written``: it exists, and it started before that (a PID reused by a newer process is not
    the owner)."""
    if pid == os.getpid():
        return False  # this process is starting: nothing of it is being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(pid)
    return started is None or started <= written + 1.0  # /proc's start time has 1/CLK_TCK s steps


def stale_temporaries(folder: str) -> list[str]:
    """Temporary files (or folders) in ``folder`` whose writer is dead (this host's only)."""
    stale = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        m = _TMP.match(name)
        host = m["host"] if m else _HOST
        m = m or _LEGACY_TMP.match(name)
        if not m or host != _HOST:
            continue  # not ours, or another host's: its owner cannot be checked from here
        path = os.path.join(folder, name)
        try:
            written = os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        if not _owner_alive(int(m["pid"]), written):
            stale.append(path)
    return sorted(stale)


def remove_stale(*folders: str) -> list[str]:
    """Remove the stale temporaries of ``folders``; returns what was removed."""
    removed = []
    for folder in folders:
        for path in stale_temporaries(folder):
            _remove(path)
            removed.append(path)
    return removed


def free_bytes(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"
