"""Helpers for the registry and download tests: archives built from the reference
checkpoints, a test manifest, and the ``zoo`` fixture that starts the loopback
servers and points the package at them through environment variables."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import DATA, load_case
from servers import HubEmulator, StaticServer

REPO_ROOT = Path(__file__).resolve().parent.parent
RELEASE_PATH = "/test-org/scalr-test/releases/download/v0"
RELEASE_URL = "https://github.com" + RELEASE_PATH

#: Registry name -> reference case whose checkpoint its archive holds.
ARCHIVE_MODELS = {"test-scalr": "scalr_pretrained", "test-kitti": "waffleiron_kitti"}


def make_archive(checkpoint: Path | None = None, *, extra: list[tarfile.TarInfo] | None = None, mtime: int = 0) -> bytes:
    """A release-like ``.tar.gz``: a nested directory tree holding one checkpoint."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("WI_test/logs")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(folder)
        notes = b"model: test\n"
        info = tarfile.TarInfo("WI_test/logs/config.yaml")
        info.size, info.mtime = len(notes), mtime
        tar.addfile(info, io.BytesIO(notes))
        if checkpoint is not None:
            data = checkpoint.read_bytes()
            info = tarfile.TarInfo("WI_test/logs/ckpt_last.pth")
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buffer.getvalue()


def entry_dict(name: str, case_name: str, **changes) -> dict:
    """A manifest entry for a reference case's small network."""
    from scalr_zoo.config import ModelConfig

    config = ModelConfig.from_dict(load_case(case_name).config)
    entry = {
        "name": name,
        "aliases": [f"{name}-alias"],
        "family": "scalr",
        "size": f"WI-{config.arch.depth}-{config.arch.width}",
        "task": "distillation",
        "license": "apache-2.0",
        "archive": {"url": f"{RELEASE_URL}/{name}.tar.gz", "sha256": None},
        "hub": None,
        "config": config.to_dict(),
    }
    entry.update(changes)
    return entry


@dataclass
class Zoo:
    """The servers and paths of one test, with helpers to register models."""

    tmp: Path
    static: StaticServer
    hub: HubEmulator
    manifest: Path
    entries: list[dict] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return self.tmp / "scalr_cache"

    def write_manifest(self) -> None:
        self.manifest.write_text(json.dumps({"format_version": 1, "models": self.entries}), encoding="utf-8")

    def add_entry(self, entry: dict) -> None:
        self.entries = [e for e in self.entries if e["name"] != entry["name"]] + [entry]
        self.write_manifest()

    def serve_archive(self, name: str, data: bytes) -> None:
        self.static.files[f"{RELEASE_PATH}/{name}.tar.gz"] = data

    def archive_requests(self, name: str) -> int:
        return self.static.count("GET", f"{RELEASE_PATH}/{name}.tar.gz")

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def archives() -> dict[str, bytes]:
    """Release-like archives of the reference checkpoints, by registry name."""
    return {name: make_archive(DATA / f"{case}.pth") for name, case in ARCHIVE_MODELS.items()}


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archives: dict[str, bytes]):
    """Loopback servers, a test manifest and the environment pointing at them."""
    static, hub = StaticServer().start(), HubEmulator().start()
    zoo = Zoo(tmp_path, static, hub, tmp_path / "test_manifest.json")
    for name, case in ARCHIVE_MODELS.items():
        zoo.entries.append(entry_dict(name, case))
        zoo.serve_archive(name, archives[name])
    zoo.write_manifest()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("SCALR_ZOO_CACHE", str(zoo.cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("SCALR_ZOO_RELEASES_URL", static.url)
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(zoo.manifest))
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield zoo
    finally:
        static.stop()
        hub.stop()


def run_python(code: str, env: dict[str, str]) -> "subprocess.Popen[str]":
    """Start ``python -c code`` as a real separate process."""
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
