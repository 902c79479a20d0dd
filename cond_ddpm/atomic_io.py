"""Writes that appear whole or not at all, so a crash or a full disk never leaves a half-written output.

Everything is written beside its final place and renamed into it: a rename within one file system is atomic.
"""

import fcntl
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

INCOMPLETE_PREFIX = ".incomplete-"  # staging names carry it, so readers can tell them from finished outputs
LOCK_NAME = ".lock"  # the file a process holds locked while it owns a folder (see `claim_folder`)


def _staging_name(final: Path, folder: Path | None = None) -> Path:
    # Not tempfile.mkdtemp/mkstemp: those make owner-only (0700/0600) outputs; these get the usual umask. The name is
    # cut short so that a final name near the file system's 255-byte limit still has a staging name.
    return (folder or final.parent) / f"{INCOMPLETE_PREFIX}{final.name[:200]}-{secrets.token_hex(4)}"


@contextmanager
def staged_directory(final, overwrite: bool = False):
    """Yield an empty staging folder; on success it replaces `final`, on any error it is removed.

    An existing `final` that is not an empty folder is refused unless `overwrite`; it is then swapped out only
    after the new folder is complete, so it survives every failure before that point.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():  # a folder's writer replaces folders only, never the user's file
        raise FileExistsError(f"{final} is a file, and a folder is to be written there; choose another path")
    if final.exists() and not overwrite and any(final.iterdir()):
        raise FileExistsError(f"{final} already exists and is not empty; choose another path or allow overwriting it")
    staging = _staging_name(final)
    with _naming(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    try:
        yield staging
        if final.exists():
            retired = _staging_name(final)
            final.replace(retired)
            staging.replace(final)
            shutil.rmtree(retired)
        else:
            staging.replace(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_contents(folder, marker: str):
    """Yield a staging folder whose entries then replace the entries of the same name in `folder`.

    For a folder that also holds other things (a training run's checkpoints and logs beside its saved pipeline),
    so it cannot be swapped whole. `marker` is the file that makes the folder usable (model_index.json for a
    pipeline): it leaves first and arrives last, so a crash midway leaves no marker rather than a silent mix of
    old and new files, and the old entries wait in a retired folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging, retired = _staging_name(folder, folder), _staging_name(folder, folder)
    staging.mkdir()
    try:
        yield staging
        retired.mkdir()
        if (folder / marker).exists():
            (folder / marker).replace(retired / marker)
        for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == marker):
            if (folder / entry.name).exists():
                (folder / entry.name).replace(retired / entry.name)
            entry.replace(folder / entry.name)
        shutil.rmtree(retired)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path, write) -> Path:
    """Call `write(temporary_path)`, then rename the temporary file to `path`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a file is to be written there")
    if path.exists() and not path.is_file():  # a device, a pipe or a socket: replacing it would remove it
        raise FileExistsError(f"{path} is not a regular file; choose a file's path to write to")
    temporary = _staging_name(path)
    try:
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def _naming(path: Path):
    """An OSError raised while writing names `path`, the user's path, not the staging name beside it."""
    try:
        yield
    except OSError as error:
        if INCOMPLETE_PREFIX not in f"{error.filename} {error.filename2}":
            raise
        if error.errno is None:
            raise OSError(f"cannot write {path}: {error}") from error
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror}") from error


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def claim_folder(folder, flag: str = "--output_dir"):
    """Make this process the only one writing into `folder` (created if need be) and return the open lock file;
    closing it gives the folder up. Refuses a folder that another process holds, or that cannot be written.

    The lock is `flock` on `folder/.lock`: the OS releases it when its process ends, however it ends, so a crashed
    run never leaves its folder locked (the lock file itself stays, harmless).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the folder's permissions, not the lock file's, decide this
            pass
        lock = open(folder / LOCK_NAME, "a")  # held open until the folder is given up
    except OSError as error:
        raise PermissionError(f"{flag} {folder} is not writable: {error.strerror or error}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise BlockingIOError(
            f"{flag} {folder} is in use by another run (which holds {folder / LOCK_NAME}); wait until it ends, or"
            " choose another folder"
        ) from None
    return lock
