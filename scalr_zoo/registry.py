"""The registry of released weights: ``weights_manifest.json``.

Every released checkpoint has one :class:`PretrainedEntry`: its registry name
and aliases, what it is (family, teacher, size, task, dataset, fraction of the
labels), the :class:`~scalr_zoo.config.ModelConfig` it needs (architecture,
preprocessing defaults, class names), the reported mIoU, paper, licence, the
original release archive and, only where one really exists, a Hugging Face
Hub location with the sha256 of each file.

Names follow ``waffleiron-<pretraining>[-<lp|ft>-<dataset>[-<labels>]]``:
``waffleiron-dinov2-L`` is ScaLR (WaffleIron WI-48-768 distilled from DINOv2
ViT-L/14), ``waffleiron-scalrplus`` its improved ScaLR+ recipe, ``lp`` a
linear probe and ``ft`` a finetuning on ``nuscenes``, ``kitti``, ``pandar64``
or ``pandargt`` with a percentage of the labels, and
``waffleiron-<depth>-<width>-<dataset>`` a network trained from scratch. Each
entry also answers to the file name of its original archive.

The packaged manifest ships inside the wheel. ``SCALR_ZOO_MANIFEST`` (read at
each call) names further manifest files, separated by ``os.pathsep``, whose
entries are added to it; an entry with the name of a packaged one replaces it.
That is how a company registers private weights or a mirror's Hub copies, and
how the tests register small models.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import _SENSOR_ALIASES, ModelConfig

__all__ = [
    "HubLocation",
    "PretrainedEntry",
    "list_models",
    "model_info",
    "find_entry",
    "entry_for_archive",
    "iter_entries",
    "manifest_entries",
    "MANIFEST_ENV",
    "UnknownModelError",
]

logger = logging.getLogger(__name__)

#: Environment variable naming extra manifest files (``os.pathsep``-separated).
MANIFEST_ENV = "SCALR_ZOO_MANIFEST"
MANIFEST_FORMAT_VERSION = 1
_SHA256_HEX = frozenset("0123456789abcdef")
#: Registry names and archive file names become cache paths: no separators, no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class UnknownModelError(KeyError, ValueError):
    """No registered weights have this name (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class HubLocation:
    """Where a model lives on a Hugging Face Hub.

    Attributes:
        repo_id: ``owner/name`` of the model repository.
        revision: branch, tag or (preferably) commit hash to download.
        files: file name -> sha256 (lowercase hex) of every file the model
            needs (``model.safetensors``, ``config.json``); each is verified
            after download and on every read from the cache.
    """

    repo_id: str
    revision: str
    files: Mapping[str, str]

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"hub.repo_id must be 'owner/name', got {self.repo_id!r}")
        if not self.revision:
            raise ValueError(f"hub.revision of {self.repo_id} must name a branch, tag or commit")
        for name in ("model.safetensors", "config.json"):
            if name not in self.files:
                raise ValueError(f"hub.files of {self.repo_id} must give the sha256 of {name}")
        for name, digest in self.files.items():
            _check_sha256(digest, f"hub.files[{name!r}] of {self.repo_id}")
        object.__setattr__(self, "files", dict(self.files))


@dataclass(frozen=True)
class PretrainedEntry:
    """One set of released weights (one manifest entry).

    Attributes:
        name: registry name, e.g. ``"waffleiron-dinov2-L"``.
        family: ``"scalr"``, ``"scalr-plus"`` or ``"waffleiron"``.
        size: network, e.g. ``"WI-48-768"`` (depth 48, width 768).
        task: ``"distillation"`` (backbone + distillation head, no labels),
            ``"linear-probing"`` (frozen backbone + class head),
            ``"finetuning"`` or ``"supervised"`` (trained from scratch).
        config: architecture, preprocessing defaults and class names.
        aliases: other names it answers to (case-insensitive, like the name).
        teacher: the image model distilled, e.g. ``"dinov2-vitl14"``.
        dataset: the labelled dataset of the class head (None without one).
        data_fraction: fraction of that dataset's training labels used.
        pretraining_datasets: data the distillation saw.
        sensors: intensity presets that apply (the training sensors).
        miou: reported mIoU (%) on ``dataset``'s validation set.
        description: one-paragraph summary.
        paper: URL of the paper.
        license: licence of the release (SPDX-like identifier).
        archive_url: the original release archive (``.tar.gz``).
        archive_sha256: its sha256 when published (the original releases publish none).
        hub: a Hugging Face Hub copy, only where one exists.
    """

    name: str
    family: str
    size: str
    task: str
    config: ModelConfig
    aliases: tuple[str, ...] = ()
    teacher: str | None = None
    dataset: str | None = None
    data_fraction: float | None = None
    pretraining_datasets: tuple[str, ...] = ()
    sensors: tuple[str, ...] = ()
    miou: float | None = None
    description: str = ""
    paper: str | None = None
    license: str | None = None
    archive_url: str | None = None
    archive_sha256: str | None = None
    hub: HubLocation | None = None

    def __post_init__(self) -> None:
        for attr in ("aliases", "pretraining_datasets", "sensors"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if not _SAFE_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits and . _ + - (no path separators)")
        if self.archive_url is None and self.hub is None:
            raise ValueError(f"entry {self.name!r} needs an archive URL or a Hub location")
        if self.archive_url is not None and not (
            self.archive_url.startswith(("https://", "http://")) and _SAFE_NAME.fullmatch(str(self.archive_filename))
        ):
            raise ValueError(f"archive.url {self.archive_url!r} must be an http(s) URL ending in a file name")
        if self.archive_sha256 is not None:
            _check_sha256(self.archive_sha256, f"archive.sha256 of {self.name}")

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names of the head, in output order (None for a distillation head)."""
        return self.config.classes

    @property
    def archive_filename(self) -> str | None:
        """File name of the original release archive."""
        return self.archive_url.rsplit("/", 1)[-1] if self.archive_url else None

    def model_config(self) -> ModelConfig:
        """The entry's :class:`ModelConfig` with ``name`` and ``meta`` filled in
        (family, task, dataset, mIoU, paper, licence, source...), as written to ``config.json``."""
        meta = {
            key: value
            for key, value in (
                ("family", self.family),
                ("size", self.size),
                ("task", self.task),
                ("teacher", self.teacher),
                ("dataset", self.dataset),
                ("data_fraction", self.data_fraction),
                ("pretraining_datasets", list(self.pretraining_datasets) or None),
                ("sensors", list(self.sensors) or None),
                ("miou", self.miou),
                ("description", self.description or None),
                ("paper", self.paper),
                ("license", self.license),
                ("archive_url", self.archive_url),
            )
            if value is not None
        }
        return ModelConfig(self.config.arch, self.config.preprocess, self.config.classes, self.name, meta)

    def to_dict(self) -> dict[str, Any]:
        """The manifest (JSON) form of this entry."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "family": self.family,
            "teacher": self.teacher,
            "size": self.size,
            "task": self.task,
            "dataset": self.dataset,
            "data_fraction": self.data_fraction,
            "pretraining_datasets": list(self.pretraining_datasets),
            "sensors": list(self.sensors),
            "miou": self.miou,
            "description": self.description,
            "paper": self.paper,
            "license": self.license,
            "archive": {"url": self.archive_url, "sha256": self.archive_sha256} if self.archive_url else None,
            "hub": (
                {"repo_id": self.hub.repo_id, "revision": self.hub.revision, "files": dict(self.hub.files)}
                if self.hub
                else None
            ),
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PretrainedEntry":
        """Parse one manifest entry (see :meth:`to_dict`)."""
        data = dict(data)
        known = {f.name for f in fields(cls)} - {"archive_url", "archive_sha256"} | {"archive"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        missing = {"name", "family", "size", "task", "config"} - set(data)
        if missing:
            raise ValueError(f"missing keys {sorted(missing)}")
        archive = data.pop("archive", None) or {}
        hub = data.pop("hub", None)
        config = ModelConfig.from_dict(data.pop("config"))
        return cls(
            config=config,
            archive_url=archive.get("url"),
            archive_sha256=archive.get("sha256"),
            hub=HubLocation(**hub) if hub else None,
            **{k: v for k, v in data.items() if v is not None},
        )


def _check_sha256(digest: Any, what: str) -> None:
    if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
        raise ValueError(f"{what} must be 64 lowercase hex digits, got {digest!r}")


def _packaged_manifest() -> Path:
    return Path(str(resources.files("scalr_zoo") / "weights_manifest.json"))


def _manifest_paths() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(MANIFEST_ENV, "").split(os.pathsep) if p.strip()]
    for path in extra:
        if not path.is_file():
            raise FileNotFoundError(f"{MANIFEST_ENV} names {path}, which is not a file")
    return [_packaged_manifest(), *extra]


@functools.lru_cache(maxsize=8)
def _read_manifest(path: str, mtime_ns: int) -> tuple[PretrainedEntry, ...]:
    """Entries of one manifest file (cached per path and modification time)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the weights manifest {path}: {exc}") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list):
        raise ValueError(f"{path} is not a weights manifest: expected an object with a 'models' list")
    version = data.get("format_version", MANIFEST_FORMAT_VERSION)
    if version != MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"{path} has manifest format {version}; this scalr-zoo reads format {MANIFEST_FORMAT_VERSION}. "
            "Upgrade scalr-zoo."
        )
    entries = []
    for index, raw in enumerate(data["models"]):
        label = raw.get("name", f"#{index}") if isinstance(raw, Mapping) else f"#{index}"
        try:
            entries.append(PretrainedEntry.from_dict(raw))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest {path}, entry {label}: {exc}") from exc
    return tuple(entries)


def _manifest_key() -> tuple[tuple[str, int], ...]:
    return tuple((str(path), path.stat().st_mtime_ns) for path in _manifest_paths())


@functools.lru_cache(maxsize=8)
def _registry(key: tuple[tuple[str, int], ...]) -> tuple[dict[str, PretrainedEntry], dict[str, str]]:
    """Entries by name and the lookup table (lower-cased name or alias -> name) of these manifests."""
    by_name: dict[str, PretrainedEntry] = {}
    for path, mtime_ns in key:
        for entry in _read_manifest(path, mtime_ns):
            if entry.name in by_name:
                logger.info("manifest %s replaces the entry %s", path, entry.name)
            by_name[entry.name] = entry
    table: dict[str, str] = {}
    for entry in by_name.values():
        for alias in (entry.name, *entry.aliases):
            owner = table.setdefault(alias.lower(), entry.name)
            if owner != entry.name:
                raise ValueError(f"the name {alias!r} is claimed by both {owner!r} and {entry.name!r} in the manifests")
    return by_name, table


def manifest_entries() -> dict[str, PretrainedEntry]:
    """All registered entries by name: the packaged manifest, then those of ``SCALR_ZOO_MANIFEST``.

    Raises:
        ValueError: an unreadable manifest, a bad entry, or a name or alias
            claimed by two entries.
    """
    return dict(_registry(_manifest_key())[0])


def find_entry(name: str) -> PretrainedEntry | None:
    """The entry registered under ``name`` or one of its aliases (case-insensitive), else None."""
    by_name, table = _registry(_manifest_key())
    canonical = table.get(str(name).lower())
    return by_name[canonical] if canonical else None


def model_info(name: str) -> PretrainedEntry:
    """The registry entry of ``name`` (a registry name or alias).

    Raises:
        UnknownModelError: unknown name (a ``KeyError``); the message suggests close names.
    """
    entry = find_entry(name)
    if entry is None:
        known = {key.lower(): key for e in manifest_entries().values() for key in (e.name, *e.aliases)}
        close = [known[k] for k in difflib.get_close_matches(str(name).lower(), list(known), n=3, cutoff=0.6)]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(f"no registered weights named {name!r}.{hint} See scalr_zoo.list_models().")
    return entry


def entry_for_archive(filename: str) -> PretrainedEntry | None:
    """The entry whose original archive has this file name, if any."""
    for entry in manifest_entries().values():
        if entry.archive_filename == filename:
            return entry
    return None


_FILTERABLE = ("family", "task", "dataset", "teacher", "size", "license", "data_fraction", "sensors", "pretraining_datasets")


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        value = value.lower()
        return _SENSOR_ALIASES.get(value, value)
    return value


def _matches(actual: Any, wanted: Any) -> bool:
    options = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else (wanted,)
    options = {_normalise(option) for option in options}
    values = actual if isinstance(actual, tuple) else (actual,)
    return any(_normalise(value) in options for value in values)


def list_models(pattern: str = "*", **filters: Any) -> list[str]:
    """Registered model names matching ``pattern`` and every filter, sorted.

    Args:
        pattern: fnmatch wildcard on the name or an alias, case-insensitive
            (``"*kitti*"``, ``"waffleiron-dinov2-L-ft-*"``).
        **filters: field=value (or field=[values], any of them): ``family``,
            ``task``, ``dataset``, ``teacher``, ``size``, ``license``,
            ``data_fraction``, ``sensors``, ``pretraining_datasets``. Dataset
            names accept the sensor aliases (``kitti``, ``panda64``...).

    Example:
        >>> list_models("*-lp-*", family="scalr")  # doctest: +SKIP
        ['waffleiron-dinov2-L-lp-kitti', 'waffleiron-dinov2-L-lp-nuscenes', ...]
    """
    unknown = set(filters) - set(_FILTERABLE)
    if unknown:
        raise ValueError(f"cannot filter on {sorted(unknown)}; filter on any of {list(_FILTERABLE)}")
    pattern = pattern.lower()
    names = []
    for entry in manifest_entries().values():
        if not any(fnmatch.fnmatchcase(key.lower(), pattern) for key in (entry.name, *entry.aliases)):
            continue
        if all(_matches(getattr(entry, key), wanted) for key, wanted in filters.items()):
            names.append(entry.name)
    return sorted(names)


def iter_entries(names: Iterable[str] | None = None) -> list[PretrainedEntry]:
    """Entries of ``names`` (registry names or aliases), or all of them in manifest order."""
    if names is None:
        return list(manifest_entries().values())
    return [model_info(name) for name in names]
