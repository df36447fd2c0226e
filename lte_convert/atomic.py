"""Atomic outputs: nothing half-written is ever left where a finished file belongs.

    with atomic_path("model.onnx") as tmp: save(tmp)

writes into a hidden folder beside the output, `.<name>.lte-tmp-<pid>-<random>`, flushes
what was written to disk (fsync of every file and folder), then renames it onto the output.
A folder that replaces an older one goes in by three steps, so that a crash at any point
keeps one complete version: the old folder is renamed aside (`.<name>.lte-old-<pid>-...`),
the new one renamed in, the old one deleted. The output gets the permissions a plain save
gives (umask), not the owner-only ones of a temporary folder.

A process killed with -9 cannot clean up after itself: the next atomic write of the same
output deletes the temporaries of processes that no longer run (and puts back a folder that
was moved aside but never replaced). Disk full (ENOSPC, EDQUOT) becomes `DiskFull`, a user
error with its own exit code, after the temporaries are removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from lte_convert.errors import DiskFull

_TMP, _OLD = "lte-tmp", "lte-old"
_FULL = {errno.ENOSPC, errno.EDQUOT}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync(path: Path) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_tree(path: Path, mode_files: int, mode_dirs: int) -> None:
    """fsync every file and folder under `path` (deepest first) and give them normal modes."""
    if path.is_file():
        os.chmod(path, os.stat(path).st_mode & 0o7777 | mode_files)
        fsync(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            f = Path(root, name)
            if not f.is_symlink():
                os.chmod(f, os.stat(f).st_mode & 0o7777 | mode_files)
                fsync(f)
        for name in dirs:
            d = Path(root, name)
            if not d.is_symlink():
                os.chmod(d, mode_dirs)
                fsync(d)
    os.chmod(path, mode_dirs)
    fsync(path)


def leftovers(final: str | os.PathLike) -> list[Path]:
    """The hidden temporaries beside `final` whose writer no longer runs."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.({_TMP}|{_OLD})-(\d+)-")
    found = []
    if final.parent.is_dir():
        for p in final.parent.iterdir():
            m = pattern.match(p.name)
            if m and not _alive(int(m.group(2))):
                found.append(p)
    return sorted(found)


def clean_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of `final` left (an old folder moved aside but never
    replaced goes back to `final`); returns the paths it removed or restored."""
    final = Path(final)
    done = []
    for p in leftovers(final):
        if f".{_OLD}-" in p.name and not final.exists():
            os.replace(p, final)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def _is_full(e: BaseException, folder: Path) -> bool:
    """Whether the write failed for lack of space. Writers do not all keep the errno (numpy's
    tofile: "problem writing element ..."; torch.save: "file write failed"), so a failed write
    on a disk left with less than 1 MiB free counts too."""
    if (isinstance(e, OSError) and e.errno in _FULL) or "No space left on device" in str(e):
        return True
    try:
        return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def as_disk_full(error: BaseException) -> DiskFull | None:
    """A write that failed outside atomic_path (e.g. a training checkpoint) as DiskFull, when
    the errno or message says the disk is full; None otherwise."""
    if not ((isinstance(error, OSError) and error.errno in _FULL)
            or "No space left on device" in str(error)):
        return None
    where = getattr(error, "filename", None)
    return DiskFull(f"The disk is full: {f'writing {where} failed: ' if where else ''}{error}. "
                    "Finished outputs were not touched (each is written whole or not at all); "
                    "free some space or choose another folder, then run the same command "
                    "again (add --resume to continue a training run).")


def disk_full(where: Path, error: BaseException) -> DiskFull:
    """The DiskFull error for a write to `where` that failed with `error`."""
    folder = where.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"The disk is full: writing {where} failed ({free} in {folder}: "
                    f"{getattr(error, 'strerror', None) or error}). Nothing was left half-written; "
                    "free some space or choose another folder, then run the same command again.")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary path beside `final`; on success flush it and rename it onto `final`.

    On any exception the temporary file or folder is removed and `final` is untouched; a
    full disk raises DiskFull.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    prefix = f".{final.name}."
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{_TMP}-{os.getpid()}-", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    umask = _umask()
    try:
        try:
            yield target
            _flush_tree(target, 0o666 & ~umask, 0o777 & ~umask)
            if is_dir and final.exists():
                aside = Path(tempfile.mkdtemp(prefix=f"{prefix}{_OLD}-{os.getpid()}-",
                                              dir=final.parent))
                os.replace(final, aside)          # rename(2) of a folder onto an empty one
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(aside, final)
                    raise
                fsync(final.parent)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(target, final)
                fsync(final.parent)
        except Exception as e:
            if _is_full(e, final.parent):
                shutil.rmtree(tmp, ignore_errors=True)       # before measuring what is free
                raise disk_full(final, e) from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
