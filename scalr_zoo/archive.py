"""Safe reading of the original release archives (``.tar.gz``).

An archive is checked member by member before anything is read from it: an
absolute path, a ``..`` component, a symbolic or hard link whose target
leaves the archive, or a device, FIFO or other special file makes the whole
archive refused (:class:`UnsafeArchiveError`). Nothing is then extracted to
the member's own path: only the one checkpoint found by scanning is copied,
as a byte stream, to a file name the caller chooses.
"""

from __future__ import annotations

import gzip
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

#: What a damaged or truncated compressed tar raises while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)

__all__ = ["UnsafeArchiveError", "check_members", "find_checkpoint_member", "extract_checkpoint", "CHECKPOINT_SUFFIXES"]

logger = logging.getLogger(__name__)

#: File name endings of checkpoints inside a release archive.
CHECKPOINT_SUFFIXES = (".pth", ".pt")


class UnsafeArchiveError(ValueError):
    """The archive has a member that could write or point outside its extraction directory."""


def _escapes(path: str) -> bool:
    """Whether a normalised POSIX path is absolute or climbs above the archive root."""
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):  # "/x" or a Windows drive "C:"
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def check_members(tar: tarfile.TarFile, source: str) -> list[tarfile.TarInfo]:
    """All members of ``tar``, after checking that none is unsafe.

    Raises:
        UnsafeArchiveError: naming the first unsafe member and why.
    """
    members = tar.getmembers()
    for member in members:
        name = member.name.replace("\\", "/")
        if _escapes(name) or ".." in name.split("/"):
            raise UnsafeArchiveError(
                f"refusing {source}: member {member.name!r} has an absolute path or a '..' component"
            )
        if member.issym():
            target = member.linkname.replace("\\", "/")
            if target.startswith("/") or _escapes(posixpath.join(posixpath.dirname(name), target)):
                raise UnsafeArchiveError(
                    f"refusing {source}: symbolic link {member.name!r} -> {member.linkname!r} points outside the archive"
                )
        elif member.islnk():
            if _escapes(member.linkname.replace("\\", "/")):
                raise UnsafeArchiveError(
                    f"refusing {source}: hard link {member.name!r} -> {member.linkname!r} points outside the archive"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"refusing {source}: member {member.name!r} is a device, FIFO or other special file"
            )
    return members


def find_checkpoint_member(members: list[tarfile.TarInfo], source: str) -> tarfile.TarInfo:
    """The single regular-file checkpoint (``.pth``/``.pt``) among ``members``.

    Raises:
        ValueError: no checkpoint, or several (listed).
    """
    candidates = [m for m in members if m.isfile() and m.name.lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        listing = ", ".join(m.name for m in members[:10]) + (" ..." if len(members) > 10 else "")
        raise ValueError(f"{source} holds no checkpoint file ({'/'.join(CHECKPOINT_SUFFIXES)}); members: {listing}")
    raise ValueError(
        f"{source} holds several checkpoints ({', '.join(m.name for m in candidates)}); "
        "extract the one you want and load it as a .pth file with config="
    )


def extract_checkpoint(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy the checkpoint of a release archive to ``destination``.

    The archive is refused if any member is unsafe (see the module notes);
    the checkpoint is found by scanning and written atomically (temporary
    file in the same directory, then renamed).

    Args:
        archive: a ``.tar.gz`` (or any tar format ``tarfile`` reads).
        destination: path of the checkpoint file to write.

    Returns:
        ``destination`` as a Path.

    Raises:
        FileNotFoundError: no such archive.
        UnsafeArchiveError: path traversal, an escaping link or a special file.
        ValueError: not a readable tar archive, or not exactly one checkpoint in it.
    """
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise FileNotFoundError(f"no archive at {archive}")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except _READ_ERRORS as exc:
        raise ValueError(f"{archive} is not a readable tar archive ({exc}); is the download complete?") from exc
    with tar:
        try:
            member = find_checkpoint_member(check_members(tar, str(archive)), str(archive))
            stream = tar.extractfile(member)
            assert stream is not None  # a regular file member always has a stream
            destination.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=destination.name, suffix=".partial")
            try:
                with os.fdopen(handle, "wb") as out, stream:
                    shutil.copyfileobj(stream, out, length=1 << 20)
                os.replace(partial, destination)
            except BaseException:
                Path(partial).unlink(missing_ok=True)
                raise
        except _READ_ERRORS as exc:
            raise ValueError(f"{archive} is a damaged tar archive ({exc}); delete it and download it again") from exc
    logger.debug("extracted %s from %s to %s", member.name, archive, destination)
    return destination
