"""Downloads and the local cache: Hub snapshots and original release archives.

:func:`download` turns a registry name or an ``hf-hub:owner/repo[@revision]``
source into a local directory holding ``model.safetensors`` and
``config.json``:

* **Hub** (``hf-hub:`` sources, registry entries with a Hub location):
  ``huggingface_hub.snapshot_download`` into the Hugging Face cache, then
  every file is checked against a sha256: the manifest's where it gives one,
  else the hash the Hub itself announced (the ETag that names the cached
  blob: sha256 for LFS files, git blob sha1 for small ones). This runs after
  each download and on every read from the cache.
* **Original archives** (registry entries without a Hub copy): the release
  ``.tar.gz`` is downloaded with urllib and a progress bar; its sha256 is
  recorded at the first download (the releases publish none) and a later
  download that differs is refused; the checkpoint is extracted safely
  (:mod:`scalr_zoo.archive`), read with ``torch.load(weights_only=True)``
  and converted to ``model.safetensors`` + ``config.json`` + ``README.md``
  under :func:`cache_dir`, with the sha256 of each file recorded and checked
  on every later read. A file lock makes concurrent processes wait for one
  download and conversion instead of repeating it.

A file that fails its check is deleted and :class:`IntegrityError` names it
with both hashes; nothing is loaded.

Environment (read at each call, so it may change while the process runs):

``SCALR_ZOO_CACHE``
    converted models and archive records; default ``$HF_HOME/scalr_zoo`` when
    ``HF_HOME`` is set, else ``$XDG_CACHE_HOME/scalr_zoo`` or ``~/.cache/scalr_zoo``.
``SCALR_ZOO_RELEASES_URL``
    replaces the ``https://github.com`` prefix of archive URLs (a mirror of
    GitHub releases).
``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``
    the Hub (or a mirror) and its cache, as huggingface_hub reads them.
``HF_HUB_OFFLINE``
    ``1`` means no network request at all (like ``local_files_only=True``):
    load from the caches or fail saying what to download.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from .registry import PretrainedEntry, model_info

__all__ = [
    "download",
    "download_archive",
    "fetch_hub",
    "cache_dir",
    "hub_cache_dir",
    "hub_endpoint",
    "is_offline",
    "mirror_url",
    "parse_hub_source",
    "sha256_file",
    "verify_sha256",
    "IntegrityError",
    "NotCachedError",
    "SourceNotFoundError",
    "HUB_PREFIX",
    "MODEL_FILES",
    "SOURCE_RECORD",
]

logger = logging.getLogger(__name__)

#: Prefix of Hugging Face Hub sources: ``hf-hub:owner/repo[@revision]``.
HUB_PREFIX = "hf-hub:"
#: The files a model directory needs.
MODEL_FILES = ("config.json", "model.safetensors")
#: Written last into a converted model directory: its origin and the sha256 of its files.
SOURCE_RECORD = "scalr_zoo_source.json"
GITHUB_PREFIX = "https://github.com"
_CHUNK = 1 << 20


class IntegrityError(OSError):
    """A file does not have the sha256 it must have; it was deleted and nothing was loaded."""


class NotCachedError(FileNotFoundError):
    """Downloads are off (offline mode or ``local_files_only``) and the model is not in the cache."""


class SourceNotFoundError(FileNotFoundError):
    """The repository, revision, file or archive does not exist where it was looked for."""


# --- environment ------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline(local_files_only: bool = False) -> bool:
    """Whether no network request may be made: ``local_files_only`` or ``HF_HUB_OFFLINE=1``."""
    return bool(local_files_only) or _env_true("HF_HUB_OFFLINE")


def _hf_home() -> Path | None:
    value = os.environ.get("HF_HOME")
    return Path(value).expanduser() if value else None


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def cache_dir() -> Path:
    """Root of the scalr-zoo cache (``SCALR_ZOO_CACHE``, see the module notes)."""
    if os.environ.get("SCALR_ZOO_CACHE"):
        return Path(os.environ["SCALR_ZOO_CACHE"]).expanduser()
    home = _hf_home()
    return home / "scalr_zoo" if home else _xdg_cache() / "scalr_zoo"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = _hf_home() or _xdg_cache() / "huggingface"
    return home / "hub"


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` without a trailing slash, or None for huggingface_hub's default."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def mirror_url(url: str) -> str:
    """``url`` with its ``https://github.com`` prefix replaced by ``SCALR_ZOO_RELEASES_URL`` when set."""
    mirror = os.environ.get("SCALR_ZOO_RELEASES_URL", "").strip().rstrip("/")
    if mirror and url.startswith(GITHUB_PREFIX + "/"):
        return mirror + url[len(GITHUB_PREFIX):]
    return url


def _progress_disabled() -> bool:
    from huggingface_hub.utils import are_progress_bars_disabled

    return are_progress_bars_disabled()


# --- hashing ----------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Lowercase hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    """Delete ``path`` and, when it is a symlink (Hub snapshot), the blob it points to."""
    target = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if target is not None:
        target.unlink(missing_ok=True)


def verify_sha256(path: str | os.PathLike, expected: str, *, what: str, algorithm: str = "sha256") -> None:
    """Check a file's hash; on mismatch delete it and raise.

    Args:
        path: the file (a Hub snapshot symlink is followed; both it and its blob go).
        expected: lowercase hex digest it must have.
        what: how to name the file in the error (its source).
        algorithm: ``"sha256"`` or ``"git-sha1"`` (git blob hash, Hub ETag of small files).

    Raises:
        IntegrityError: naming the file, the expected and the actual hash.
    """
    path = Path(path)
    actual = sha256_file(path) if algorithm == "sha256" else _git_blob_sha1(path.resolve())
    if actual != expected:
        _remove(path)
        raise IntegrityError(
            f"{path.name} of {what} is corrupted: expected {algorithm} {expected}, got {actual}. "
            f"The file ({path}) was deleted; nothing was loaded. Load again to download it afresh."
        )


# --- locking and atomic writes ----------------------------------------------------------------


class _Lock:
    """An inter-process file lock under the cache that says when it has to wait."""

    def __init__(self, key: str) -> None:
        path = cache_dir() / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path))
        self._key = key

    def __enter__(self) -> "_Lock":
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            logger.info("another process is downloading %s; waiting for it", self._key)
            self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- Hugging Face Hub -------------------------------------------------------------------------


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``"hf-hub:owner/repo@rev"`` -> ``("owner/repo", "rev")`` (revision None when absent).

    Raises:
        ValueError: not of that form.
    """
    if not source.startswith(HUB_PREFIX):
        raise ValueError(f"{source!r} is not a Hub source; expected {HUB_PREFIX}owner/repo[@revision]")
    repo_id, _, revision = source[len(HUB_PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (_ and not revision):
        raise ValueError(f"{source!r}: expected {HUB_PREFIX}owner/repo or {HUB_PREFIX}owner/repo@revision")
    return repo_id, revision or None


def _hub_blob_hash(path: Path) -> tuple[str, str] | None:
    """(algorithm, digest) the Hub announced for a cached snapshot file: its blob's name (the ETag)."""
    if not path.is_symlink():
        return None
    blob = path.resolve().name
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return "sha256", blob
    if len(blob) == 40 and all(c in "0123456789abcdef" for c in blob):
        return "git-sha1", blob
    return None


def fetch_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    sha256: Mapping[str, str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Download (or find in the cache) a model repository and verify its files.

    Args:
        repo_id: ``owner/name``.
        revision: branch, tag or commit; default ``main``.
        sha256: file name -> expected sha256 (the manifest's); files without
            one are checked against the hash the Hub announced.
        local_files_only: no network; the cache only.
        force_download: download again even if cached.
        token: Hub token (default: huggingface_hub's, e.g. ``HF_TOKEN``).

    Returns:
        The snapshot directory holding ``model.safetensors`` and ``config.json``.

    Raises:
        SourceNotFoundError: no such repository, revision or file.
        NotCachedError: offline and not in the cache.
        ConnectionError: the Hub cannot be reached and nothing is cached.
        IntegrityError: a file fails its hash check (it is deleted).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline(local_files_only)
    endpoint = hub_endpoint()
    where = endpoint or "the Hugging Face Hub"
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(MODEL_FILES),
                cache_dir=str(hub_cache_dir()),
                endpoint=endpoint,
                local_files_only=offline,
                force_download=force_download,
                token=token,
            )
        )
    except GatedRepoError as exc:
        raise SourceNotFoundError(
            f"{repo_id} on {where} is gated: accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFoundError(
            f"no model repository {repo_id!r} on {where}; check the name, or log in "
            "(hf auth login or HF_TOKEN) if it is private"
        ) from exc
    except RevisionNotFoundError as exc:
        raise SourceNotFoundError(f"{repo_id} on {where} has no revision {revision!r} (branch, tag or commit)") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise NotCachedError(
                f"{label} is not in the Hub cache ({hub_cache_dir()}) and downloads are off "
                f"({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'}). "
                f"Run scalr_zoo.download({label!r}) once with network access."
            ) from exc
        raise ConnectionError(
            f"cannot reach {where} to download {label}, and it is not in the cache ({hub_cache_dir()}): {exc}"
        ) from exc
    missing = [name for name in MODEL_FILES if not (snapshot / name).is_file()]
    if missing:
        raise SourceNotFoundError(
            f"{label} has no {' or '.join(missing)} at revision {snapshot.name}; a scalr-zoo model repository "
            "holds model.safetensors and config.json (written by model.save_pretrained / push_to_hub)"
        )
    for name in MODEL_FILES:
        path = snapshot / name
        if sha256 and name in sha256:
            verify_sha256(path, sha256[name], what=label)
            continue
        announced = _hub_blob_hash(path)
        if announced is not None:
            verify_sha256(path, announced[1], what=label, algorithm=announced[0])
    return snapshot


# --- original release archives ----------------------------------------------------------------


def _archive_path(entry: PretrainedEntry) -> Path:
    return cache_dir() / "archives" / str(entry.archive_filename)


def _record_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".json")


def _download_url(url: str, destination: Path, desc: str) -> str:
    """Stream ``url`` to ``destination`` (atomically) with a progress bar; its sha256."""
    request = urllib.request.Request(url, headers={"User-Agent": "scalr-zoo"})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SourceNotFoundError(
                f"{url} does not exist (HTTP 404); if SCALR_ZOO_RELEASES_URL points to a mirror, check that it holds this file"
            ) from exc
        raise OSError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ConnectionError(
            f"cannot reach {url} ({exc.reason}); check the network, a proxy (HTTPS_PROXY) or SCALR_ZOO_RELEASES_URL"
        ) from exc
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=destination.name, suffix=".incomplete")
    digest = hashlib.sha256()
    size = 0
    try:
        length = response.headers.get("Content-Length")
        total = int(length) if length else None
        with response, os.fdopen(handle, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=_progress_disabled()
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        if total is not None and size != total:
            raise OSError(f"incomplete download of {url}: {size} of {total} bytes; try again")
        os.replace(partial, destination)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _check_archive(entry: PretrainedEntry, archive: Path, digest: str) -> None:
    """Compare an archive's sha256 with the manifest's, then with the one recorded when it was
    first seen (recording it if there is none). Deletes the archive and raises on a mismatch."""
    what = f"the release archive of {entry.name} ({entry.archive_url})"
    if entry.archive_sha256 is not None and digest != entry.archive_sha256:
        archive.unlink(missing_ok=True)
        raise IntegrityError(
            f"{archive.name} of {what} is corrupted: expected sha256 {entry.archive_sha256} (manifest), "
            f"got {digest}. The file was deleted; nothing was loaded."
        )
    record_path = _record_path(archive)
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    if record is not None and record.get("url") == entry.archive_url:
        if record.get("sha256") != digest:
            archive.unlink(missing_ok=True)
            raise IntegrityError(
                f"{archive.name} of {what} differs from the first download (recorded {record.get('first_download')} "
                f"in {record_path}): expected sha256 {record.get('sha256')}, got {digest}. The file was deleted; "
                f"nothing was loaded. If the publisher really replaced the archive, delete {record_path} and load again."
            )
        return
    _write_json_atomic(
        record_path,
        {"url": entry.archive_url, "sha256": digest, "size": archive.stat().st_size, "first_download": _now()},
    )
    logger.info(
        "recorded sha256 %s of %s (the release publishes no checksum; later downloads must match it)",
        digest,
        entry.archive_filename,
    )


def download_archive(entry: PretrainedEntry, *, local_files_only: bool = False, force_download: bool = False) -> Path:
    """The original release archive of ``entry`` in the cache, downloaded if needed and checked.

    An archive already in ``<cache>/archives/`` (kept, or saved there by hand
    on a machine without network) is used without any request.

    Raises:
        ValueError: the entry has no archive URL.
        NotCachedError: offline and the archive is not in the cache.
        SourceNotFoundError, ConnectionError: the download failed.
        IntegrityError: the archive differs from the manifest or from its first download.
    """
    if entry.archive_url is None:
        raise ValueError(f"{entry.name} has no release archive (only a Hub location)")
    archive = _archive_path(entry)
    if archive.is_file() and not force_download:
        _check_archive(entry, archive, sha256_file(archive))
        return archive
    if is_offline(local_files_only):
        raise NotCachedError(
            f"{entry.name} is not in the cache ({cache_dir()}) and downloads are off "
            f"({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'}). Download "
            f"{mirror_url(entry.archive_url)} on a machine with network access and save it as {archive}, "
            f"or run scalr_zoo.download({entry.name!r}) once online."
        )
    url = mirror_url(entry.archive_url)
    logger.info("downloading %s", url)
    digest = _download_url(url, archive, desc=str(entry.archive_filename))
    _check_archive(entry, archive, digest)
    return archive


def _converted_dir(entry: PretrainedEntry) -> Path:
    return cache_dir() / "models" / entry.name


def _read_converted(target: Path, entry: PretrainedEntry) -> Path | None:
    """``target`` if it holds a complete conversion of ``entry`` whose files pass their recorded sha256."""
    record_path = target / SOURCE_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("archive_url") != entry.archive_url or any(not (target / n).is_file() for n in record["files"]):
        return None
    for name, digest in record["files"].items():
        verify_sha256(target / name, digest, what=f"{entry.name} (converted in {target})")
    return target


def _convert_into_cache(entry: PretrainedEntry, archive: Path, target: Path) -> None:
    from . import __version__
    from .convert import convert_archive

    convert_archive(archive, entry.model_config(), target, overwrite=True)
    _write_json_atomic(
        target / SOURCE_RECORD,
        {
            "name": entry.name,
            "archive_url": entry.archive_url,
            "archive_sha256": sha256_file(archive),
            "files": {name: sha256_file(target / name) for name in MODEL_FILES},
            "converted_at": _now(),
            "scalr_zoo_version": __version__,
        },
    )


def fetch_archive_model(
    entry: PretrainedEntry, *, local_files_only: bool = False, force_download: bool = False, keep_archive: bool = False
) -> Path:
    """The converted model directory of an archive-backed entry, downloading and converting it once.

    Reads the cache first (no network); otherwise, holding a per-model file
    lock, downloads the archive, converts it and records the hashes. A
    process that finds the lock held waits, then reads what the other wrote.
    """
    target = _converted_dir(entry)
    if not force_download and _read_converted(target, entry):
        return target
    with _Lock(entry.name):
        if not force_download and _read_converted(target, entry):
            return target  # converted by another process while this one waited
        archive = download_archive(entry, local_files_only=local_files_only, force_download=force_download)
        _convert_into_cache(entry, archive, target)
        if not keep_archive:
            archive.unlink(missing_ok=True)
    logger.info("converted %s into %s", entry.name, target)
    return target


# --- entry point ------------------------------------------------------------------------------


def download(
    source: str,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory with ``model.safetensors`` and ``config.json`` for a registry name or Hub source.

    Args:
        source: a registry name or alias (see :func:`scalr_zoo.list_models`)
            or ``hf-hub:owner/repo[@revision]``.
        revision: Hub revision (branch, tag, commit); overrides the manifest's
            pin (the manifest's sha256 then no longer apply) or the ``@revision``
            of the source, which it must not contradict.
        local_files_only: make no network request (as ``HF_HUB_OFFLINE=1``).
        force_download: download (and convert) again even if cached.
        token: Hugging Face token for private or gated repositories.

    Returns:
        The directory (a Hub snapshot, or the converted model under :func:`cache_dir`).

    Raises:
        UnknownModelError: not a registry name.
        NotCachedError: offline and not cached (the message says what to download).
        SourceNotFoundError: missing repository, revision, file or archive.
        IntegrityError: a file failed its hash check; it was deleted.
    """
    source = str(source)
    if source.startswith(HUB_PREFIX):
        repo_id, pinned = parse_hub_source(source)
        if revision is not None and pinned is not None and revision != pinned:
            raise ValueError(f"{source} pins revision {pinned!r} but revision={revision!r} was given")
        return fetch_hub(
            repo_id,
            revision=revision or pinned,
            local_files_only=local_files_only,
            force_download=force_download,
            token=token,
        )
    entry = model_info(source)
    if entry.hub is not None:
        pinned = revision is None or revision == entry.hub.revision
        if not pinned:
            logger.warning(
                "%s: revision %r is not the manifest's %r; its files are checked against the Hub's hashes only",
                entry.name,
                revision,
                entry.hub.revision,
            )
        return fetch_hub(
            entry.hub.repo_id,
            revision=revision or entry.hub.revision,
            sha256=entry.hub.files if pinned else None,
            local_files_only=local_files_only,
            force_download=force_download,
            token=token,
        )
    if revision is not None:
        raise ValueError(f"{entry.name} has no Hub copy; revision= applies only to Hub sources")
    return fetch_archive_model(entry, local_files_only=local_files_only, force_download=force_download)
