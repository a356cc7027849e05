"""Registry name -> original release archive -> conversion -> cache, through a loopback
static server (SCALR_ZOO_RELEASES_URL) and the real download code."""

from __future__ import annotations

import json

import pytest
import torch

import scalr_zoo
from scalr_zoo.convert import read_original_checkpoint
from scalr_zoo.hub import SOURCE_RECORD, mirror_url

from conftest import assert_matches_reference, load_case
from zoo_helpers import ARCHIVE_MODELS, archives, make_archive, run_python, zoo  # noqa: F401 (fixtures)


def model_dir(zoo, name: str):
    return zoo.cache / "models" / name


@pytest.mark.parametrize("name", sorted(ARCHIVE_MODELS))
def test_registry_name_downloads_converts_and_matches_the_reference(zoo, name):
    case = load_case(ARCHIVE_MODELS[name])
    model = scalr_zoo.load(name, device="cpu")
    assert zoo.archive_requests(name) == 1
    assert_matches_reference(model.extract(case.points), case.arrays["backbone"])
    assert_matches_reference(model.extract(case.points, head=True), case.arrays["head"])
    assert model.config.name == name and model.config.meta["archive_url"].endswith(f"/{name}.tar.gz")

    folder = model_dir(zoo, name)
    record = json.loads((folder / SOURCE_RECORD).read_text())
    assert set(record["files"]) == {"model.safetensors", "config.json"}
    assert json.loads((folder / "config.json").read_text()) == model.config.to_dict()
    assert not (zoo.cache / "archives" / f"{name}.tar.gz").exists(), "the archive is deleted after conversion"
    archive_record = json.loads((zoo.cache / "archives" / f"{name}.tar.gz.json").read_text())
    assert archive_record["sha256"] == record["archive_sha256"]

    # Later loads read the cache: no request, same weights; also by alias.
    again = scalr_zoo.load(f"{name}-alias", device="cpu")
    assert zoo.archive_requests(name) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def assert_holds_checkpoint(model, case_name: str) -> None:
    """The model's weights are exactly those of the reference case's original checkpoint."""
    original = read_original_checkpoint(load_case(case_name).checkpoint)
    state = model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k]) for k in state)


def test_second_load_offline_with_the_server_stopped(zoo, monkeypatch):
    scalr_zoo.download("test-scalr")
    requests = len(zoo.static.requests)
    zoo.static.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_holds_checkpoint(scalr_zoo.load("test-scalr", device="cpu"), "scalr_pretrained")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert scalr_zoo.load("test-scalr", device="cpu", local_files_only=True).config.name == "test-scalr"
    assert len(zoo.static.requests) == requests


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_without_cache_makes_no_request_and_says_what_to_download(zoo, monkeypatch, how, archives):
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        kwargs["local_files_only"] = True
    archive = zoo.cache / "archives" / "test-scalr.tar.gz"
    with pytest.raises(scalr_zoo.NotCachedError) as info:
        scalr_zoo.load("test-scalr", device="cpu", **kwargs)
    message = str(info.value)
    assert f"{zoo.static.url}/test-org/scalr-test/releases/download/v0/test-scalr.tar.gz" in message
    assert str(archive) in message and "scalr_zoo.download('test-scalr')" in message
    assert zoo.static.requests == []

    # Saving the archive where the message says makes the offline load work, still without a request.
    archive.parent.mkdir(parents=True)
    archive.write_bytes(archives["test-scalr"])
    assert scalr_zoo.load("test-scalr", device="cpu", **kwargs).config.name == "test-scalr"
    assert zoo.static.requests == []


def test_mirror_replaces_only_the_github_prefix(monkeypatch):
    url = "https://github.com/valeoai/ScaLR/releases/download/v0.1.0/x.tar.gz"
    monkeypatch.delenv("SCALR_ZOO_RELEASES_URL", raising=False)
    assert mirror_url(url) == url
    monkeypatch.setenv("SCALR_ZOO_RELEASES_URL", "https://mirror.example.com/gh/")
    assert mirror_url(url) == "https://mirror.example.com/gh/valeoai/ScaLR/releases/download/v0.1.0/x.tar.gz"
    assert mirror_url("https://example.org/x.tar.gz") == "https://example.org/x.tar.gz"


def test_archive_that_changed_since_the_first_download_is_refused(zoo):
    scalr_zoo.download("test-scalr")
    first = json.loads((zoo.cache / "archives" / "test-scalr.tar.gz.json").read_text())["sha256"]
    # The publisher replaces the file (same checkpoint, another archive mtime: other bytes).
    zoo.serve_archive("test-scalr", make_archive(load_case("scalr_pretrained").checkpoint, mtime=12345))
    with pytest.raises(scalr_zoo.IntegrityError) as info:
        scalr_zoo.load("test-scalr", device="cpu", force_download=True)
    message = str(info.value)
    assert "test-scalr.tar.gz" in message and first in message and "differs from the first download" in message
    new = [word for word in message.replace(".", " ").split() if len(word) == 64 and word != first]
    assert new, "the message gives the new hash too"
    assert zoo.archive_requests("test-scalr") == 2
    assert not (zoo.cache / "archives" / "test-scalr.tar.gz").exists(), "the bad download is deleted"


def test_corrupted_cache_is_detected_removed_and_downloaded_again(zoo):
    folder = scalr_zoo.download("test-scalr")
    weights = folder / "model.safetensors"
    expected = json.loads((folder / SOURCE_RECORD).read_text())["files"]["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(scalr_zoo.IntegrityError) as info:
        scalr_zoo.load("test-scalr", device="cpu")
    assert "model.safetensors" in str(info.value) and expected in str(info.value)
    assert not weights.exists()
    model = scalr_zoo.load("test-scalr", device="cpu")
    assert zoo.archive_requests("test-scalr") == 2
    assert_holds_checkpoint(model, "scalr_pretrained")


def test_missing_archive_and_unknown_name_are_clear_errors(zoo):
    del zoo.static.files["/test-org/scalr-test/releases/download/v0/test-kitti.tar.gz"]
    with pytest.raises(scalr_zoo.SourceNotFoundError, match="test-kitti.tar.gz does not exist"):
        scalr_zoo.load("test-kitti", device="cpu")
    with pytest.raises(scalr_zoo.UnknownModelError, match="Did you mean 'test-scalr'"):
        scalr_zoo.load("test-scalrr", device="cpu")
    assert not (zoo.cache / "models" / "test-kitti").exists()


def test_unsafe_archive_from_the_server_is_refused(zoo):
    import tarfile

    evil = tarfile.TarInfo("WI_test/../../escape.pth")
    evil.size = 4
    zoo.serve_archive("test-kitti", make_archive(load_case("waffleiron_kitti").checkpoint, extra=[evil]))
    with pytest.raises(scalr_zoo.UnsafeArchiveError, match="escape.pth"):
        scalr_zoo.load("test-kitti", device="cpu")
    assert not (zoo.cache / "models" / "test-kitti").exists()
    assert not list(zoo.tmp.rglob("escape.pth"))


BARRIER_SCRIPT = """
import pathlib, sys, time, logging
import scalr_zoo
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
barrier = pathlib.Path({barrier!r})
barrier.joinpath(str({index})).touch()
deadline = time.time() + 60
while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.01)
print(scalr_zoo.download("test-scalr"))
"""


def test_two_processes_loading_at_once_download_once(zoo):
    zoo.static.delay = 2.0  # keep the first download in flight while the other process asks
    barrier = zoo.tmp / "barrier"
    barrier.mkdir()
    env = zoo.subprocess_env()
    procs = [run_python(BARRIER_SCRIPT.format(barrier=str(barrier), index=i), env) for i in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert paths == {str(model_dir(zoo, "test-scalr"))}
    assert zoo.archive_requests("test-scalr") == 1
    waited = [err for _, err in results if "another process is downloading test-scalr" in err]
    assert len(waited) == 1, "exactly one process found the download in progress and waited"
    assert_holds_checkpoint(scalr_zoo.load("test-scalr", device="cpu", local_files_only=True), "scalr_pretrained")


def test_local_archive_takes_its_config_from_the_registry(zoo, archives):
    path = zoo.tmp / "test-kitti.tar.gz"  # the original file name of a registered archive
    path.write_bytes(archives["test-kitti"])
    model = scalr_zoo.load(path, device="cpu")
    assert model.config.name == "test-kitti"
    assert_holds_checkpoint(model, "waffleiron_kitti")
    other = zoo.tmp / "renamed.tar.gz"
    other.write_bytes(archives["test-kitti"])
    with pytest.raises(ValueError, match="pass config="):
        scalr_zoo.load(other, device="cpu")
    assert scalr_zoo.load(other, config="test-kitti", device="cpu").config.name == "test-kitti"
    assert zoo.static.requests == []


def test_maintainer_conversion_writes_hub_ready_folders(zoo, capsys):
    from scalr_zoo.convert import main
    from scalr_zoo.hub import sha256_file

    out = zoo.tmp / "hub_ready"
    assert main(["test-scalr", "test-kitti", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name, case_name in ARCHIVE_MODELS.items():
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        assert printed[name] == {p.name: sha256_file(p) for p in folder.iterdir()}
        assert_holds_checkpoint(scalr_zoo.load(folder, device="cpu"), case_name)
    assert "library_name: scalr-zoo" in (out / "test-scalr" / "README.md").read_text()
    with pytest.raises(SystemExit):
        main([str(out)])  # neither names nor --all


def test_cache_location_defaults(monkeypatch, tmp_path):
    from scalr_zoo.hub import cache_dir, hub_cache_dir

    for name in ("SCALR_ZOO_CACHE", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "scalr_zoo"
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == tmp_path / "hf" / "scalr_zoo"
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("SCALR_ZOO_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"

