"""Writing what users keep: one atomic write for every exported file or folder, with the
permissions a user's other tools expect, and OS failures (no permission, read-only or full
disk) turned into one line that names the path.

Written by hand: the libraries write in place (a crash leaves half a file) and safetensors
creates its files mode 0600, which a ComfyUI or AUTOMATIC1111 running as another user, or in
a container, cannot read.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdtune.errors import UserError

TMP_GLOB = ".*.tmp"  # what atomic_output's temporaries look like: hidden, ending in .tmp
NEARLY_FULL = 1 << 20  # bytes: a failed write with less than this left means the disk is full


class NoSpaceError(UserError):
    """The disk filled up while sdtune wrote something; what was there before is intact."""


def read_user_text(path: Path) -> str:
    """A user's text file (config, caption, prompt list, metadata) as UTF-8, a byte-order mark
    allowed; anything else is a one-line error naming the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: Path) -> None:
    """Give `path` (a file, or a folder and all it holds) the modes a new file gets under the
    user's umask (0644 / 0755 under the usual 022), whatever the writing library chose."""
    mask = _umask()
    if path.is_dir():
        for root, _, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def free_bytes(path: Path) -> int:
    """Free space for unprivileged writes on the file system holding `path` (or its parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(".").free


def disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write failed because the disk is full: the error says so, or (torch's
    writer says only 'unexpected pos') almost nothing is left where it wrote."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(exc) or "os error 28" in str(exc):
        return True
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        return free_bytes(where) < NEARLY_FULL
    return False


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path, the reason, what to do."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {
        errno.EACCES: "check its permissions or choose another location",
        errno.EPERM: "check its permissions or choose another location",
        errno.EROFS: "it is on a read-only file system: choose another location",
        errno.ENOSPC: "free some space and run again",
        errno.EDQUOT: "the disk quota is used up: free some space and run again",
        errno.EISDIR: "give a file path, not a folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENOENT: "check the path",
    }.get(exc.errno)
    line = f"{where}: {reason}" if where else reason
    return f"{line}; {hint}" if hint else line


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def temporary(path: Path) -> Path:
    """The temporary sibling `path` is written through: hidden, this process's, ending in .tmp
    (whoever writes an image there names its format: the suffix does not)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (the folder: so that a rename in it survives a power loss)."""
    try:  # a file through a writable handle, as its writer would have done
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(Path(root))
    else:
        fsync_path(path)


@contextmanager
def atomic_output(path: Path, folder: bool = False) -> Iterator[Path]:
    """Write `path` (a file, or a `folder`) through a temporary sibling that is fsynced, made
    readable (make_public) and renamed into place; a failure or a crash leaves `path` as it
    was, and a full disk is a NoSpaceError that says how much room is left."""
    if path.is_dir() and not folder:
        raise UserError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not path.is_dir() and folder:
        raise UserError(f"{path} is a file; give the path of a folder to write")
    tmp = temporary(path)
    try:  # created here, so that a read-only target fails before any work, naming `path`
        path.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        tmp.mkdir() if folder else tmp.touch()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        yield tmp
        make_public(tmp)
        _fsync_tree(tmp)
        _replace(tmp, path)
    except BaseException as exc:
        full = not isinstance(exc, KeyboardInterrupt) and disk_full(exc, tmp)
        remove(tmp)
        if full:
            raise NoSpaceError(
                f"{path}: the disk is full ({free_bytes(path.parent) / 2**20:.0f} MiB free after "
                "removing the partial file); free some space and run again"
            ) from exc
        raise
    try:
        fsync_path(path.parent)
    except OSError:  # some file systems cannot sync a directory; the rename is done
        pass


def check_writable(path: Path, folder: bool = False) -> None:
    """Fail now, in one line, if `path` could not be written later (after minutes of work)."""
    try:
        with atomic_output(path, folder):
            raise _Probe
    except _Probe:
        pass


class _Probe(Exception):
    """Ends check_writable's trial write before anything replaces the target."""


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`; a folder in the way is moved aside first, then removed."""
    if path.is_dir() and not path.is_symlink():
        aside = temporary(path.with_name(f"{path.name}.old"))
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, path)
