"""The Hugging Face Hub path, driven through the loopback Hub emulation (tests/servers.py)
with the real huggingface_hub download code: revision pins, offline loads, integrity
checks, clear errors, and publishing with save_pretrained / push_to_hub."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

import scalr_zoo

from conftest import DATA, assert_matches_reference, load_case
from zoo_helpers import archives, entry_dict, run_python, zoo  # noqa: F401 (fixtures)

REPO = "test-org/scalr-small"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Files of save_pretrained for the reference ScaLR model ("a") and a copy with other weights ("b")."""
    case = load_case("scalr_pretrained")
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu")
    out = {}
    for version in ("a", "b"):
        if version == "b":
            with torch.no_grad():
                model.embed.conv1.bias.add_(1.0)
        folder = tmp_path_factory.mktemp(version)
        model.save_pretrained(folder)
        out[version] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return out


def publish(zoo, saved) -> tuple[str, str]:
    """REPO with weights "a" tagged v1, then weights "b" on main; returns both commit shas."""
    zoo.hub.create_repo(REPO)
    first = zoo.hub.commit(REPO, saved["a"], tag="v1")
    second = zoo.hub.commit(REPO, saved["b"])
    return first, second


def conv1_bias(model) -> torch.Tensor:
    return model.state_dict()["embed.conv1.bias"]


def register_hub_entry(zoo, saved, revision: str, files: dict[str, bytes] | None = None) -> None:
    files = files or saved["a"]
    hub = {
        "repo_id": REPO,
        "revision": revision,
        "files": {n: hashlib.sha256(files[n]).hexdigest() for n in ("model.safetensors", "config.json")},
    }
    zoo.add_entry(entry_dict("test-hub", "scalr_pretrained", hub=hub, archive=None))


def test_registry_entry_with_a_hub_copy_loads_from_the_hub(zoo, saved):
    first, _ = publish(zoo, saved)
    register_hub_entry(zoo, saved, first)
    case = load_case("scalr_pretrained")
    model = scalr_zoo.load("test-hub", device="cpu")
    assert_matches_reference(model.extract(case.points), case.arrays["backbone"])
    assert zoo.hub.count("GET", "/resolve/") == 2  # config.json and model.safetensors
    assert zoo.static.requests == []  # not the archive path
    # A pinned commit in the cache needs no request at all.
    before = len(zoo.hub.requests)
    scalr_zoo.load("test-hub", device="cpu")
    assert len(zoo.hub.requests) == before


def test_revision_pins(zoo, saved):
    first, second = publish(zoo, saved)
    a = scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")
    b = scalr_zoo.load(f"hf-hub:{REPO}", device="cpu")
    assert torch.equal(conv1_bias(b), conv1_bias(a) + 1.0)
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@{first}", device="cpu")), conv1_bias(a))
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}", revision="v1", device="cpu")), conv1_bias(a))
    assert torch.equal(conv1_bias(scalr_zoo.WaffleIron.from_pretrained(REPO, revision=second, device="cpu")), conv1_bias(b))
    with pytest.raises(ValueError, match="pins revision 'v1'"):
        scalr_zoo.load(f"hf-hub:{REPO}@v1", revision="main", device="cpu")


def test_second_load_offline_with_the_server_stopped(zoo, saved, monkeypatch):
    publish(zoo, saved)
    expected = conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu"))
    requests = len(zoo.hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")), expected)
    assert len(zoo.hub.requests) == requests, "offline mode makes no request"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu", local_files_only=True)), expected)
    assert len(zoo.hub.requests) == requests, "local_files_only makes no request"
    zoo.hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")), expected)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # Online mode with the Hub unreachable falls back to the cache too.
    assert torch.equal(conv1_bias(scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")), expected)


def test_offline_without_cache_says_what_to_download(zoo, saved, monkeypatch):
    publish(zoo, saved)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(scalr_zoo.NotCachedError, match=rf"scalr_zoo.download\('hf-hub:{REPO}@v1'\)"):
        scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")
    assert zoo.hub.requests == []


def hashes_in(message: str) -> set[str]:
    return {word.strip(".,:()") for word in message.split() if len(word.strip(".,:()")) == 64}


def test_corrupted_download_against_the_manifest_hash(zoo, saved):
    first, _ = publish(zoo, saved)
    register_hub_entry(zoo, saved, first)
    good = hashlib.sha256(saved["a"]["model.safetensors"]).hexdigest()
    zoo.hub.corrupt.add((REPO, "model.safetensors"))
    with pytest.raises(scalr_zoo.IntegrityError) as info:
        scalr_zoo.load("test-hub", device="cpu")
    message = str(info.value)
    assert "model.safetensors" in message and good in message and len(hashes_in(message)) == 2
    blobs = zoo.tmp / "hf_home" / "hub" / "models--test-org--scalr-small" / "blobs"
    assert not (blobs / good).exists(), "the bad blob is deleted"
    zoo.hub.corrupt.clear()
    reference = scalr_zoo.read_original_checkpoint(DATA / "scalr_pretrained.pth")
    assert torch.equal(conv1_bias(scalr_zoo.load("test-hub", device="cpu")), reference["embed.conv1.bias"])


def test_manifest_hash_mismatch_is_refused_even_if_the_hub_agrees(zoo, saved):
    """The Hub serves "a" consistently, but the manifest pins the hashes of "b"."""
    first, _ = publish(zoo, saved)
    register_hub_entry(zoo, saved, first, files=saved["b"])
    with pytest.raises(scalr_zoo.IntegrityError, match="model.safetensors"):
        scalr_zoo.load("test-hub", device="cpu")


def test_corrupted_download_against_the_hub_etag(zoo, saved):
    """Without a manifest, files are checked against the hash the Hub announced (the ETag)."""
    publish(zoo, saved)
    zoo.hub.corrupt.add((REPO, "config.json"))  # small files: git blob sha1
    with pytest.raises(scalr_zoo.IntegrityError, match="config.json.*git-sha1"):
        scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")
    zoo.hub.corrupt = {(REPO, "model.safetensors")}  # LFS files: sha256
    with pytest.raises(scalr_zoo.IntegrityError, match="model.safetensors") as info:
        scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu", force_download=True)
    assert hashlib.sha256(saved["a"]["model.safetensors"]).hexdigest() in str(info.value)


def test_corrupted_cache_is_detected_and_removed(zoo, saved):
    publish(zoo, saved)
    folder = scalr_zoo.download(f"hf-hub:{REPO}@v1")
    blob = (folder / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(scalr_zoo.IntegrityError, match="model.safetensors"):
        scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")
    assert not blob.exists() and not (folder / "model.safetensors").exists()
    scalr_zoo.load(f"hf-hub:{REPO}@v1", device="cpu")  # downloaded again


def test_missing_repo_revision_and_file_are_clear_errors(zoo, saved):
    publish(zoo, saved)
    zoo.hub.create_repo("test-org/no-weights")
    zoo.hub.commit("test-org/no-weights", {"config.json": saved["a"]["config.json"]})
    with pytest.raises(scalr_zoo.SourceNotFoundError, match="no model repository 'test-org/missing'"):
        scalr_zoo.load("hf-hub:test-org/missing", device="cpu")
    with pytest.raises(scalr_zoo.SourceNotFoundError, match="has no revision 'v9'"):
        scalr_zoo.load(f"hf-hub:{REPO}@v9", device="cpu")
    with pytest.raises(scalr_zoo.SourceNotFoundError, match="has no model.safetensors"):
        scalr_zoo.load("hf-hub:test-org/no-weights", device="cpu")
    with pytest.raises(ValueError, match="expected hf-hub:owner/repo"):
        scalr_zoo.load("hf-hub:not-a-repo-id", device="cpu")


def test_save_pretrained_writes_weights_config_and_card(tmp_path):
    case = load_case("scalr_finetuned")
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu", name="my-model")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "scalr-zoo" and "lidar" in metadata["tags"]
    assert "# my-model" in card
    again = scalr_zoo.load(tmp_path, device="cpu")
    assert again.config == model.config
    assert_matches_reference(again.extract(case.points, head=True), case.arrays["head"])
    with pytest.raises(ValueError, match="keyword overrides"):
        scalr_zoo.load(tmp_path, config=case.config)


PUSH_SCRIPT = """
import scalr_zoo
model = scalr_zoo.load({folder!r}, device="cpu")
print(model.push_to_hub("someone/pushed"))
"""


def test_push_to_hub_then_load_gives_the_same_model(zoo, saved, tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    for name, data in saved["a"].items():
        (folder / name).write_bytes(data)
    # A separate process: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when imported.
    env = zoo.subprocess_env(HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_test_token", HF_HOME=str(tmp_path / "pusher"))
    proc = run_python(PUSH_SCRIPT.format(folder=str(folder)), env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert zoo.hub.count("PUT", "/lfs-upload/") == 1  # model.safetensors went through LFS
    pushed = scalr_zoo.load("hf-hub:someone/pushed", device="cpu")
    original = scalr_zoo.load(folder, device="cpu")
    assert pushed.config == original.config
    assert all(torch.equal(a, b) for a, b in zip(pushed.state_dict().values(), original.state_dict().values()))
    repo = zoo.hub.repos["someone/pushed"]
    readme = repo.commits[repo.refs["main"]]["README.md"].decode()
    assert 'scalr_zoo.load("hf-hub:someone/pushed")' in readme, "the model card names the repository"


def test_from_pretrained_reads_a_registry_name_and_a_folder(zoo, tmp_path):
    model = scalr_zoo.WaffleIron.from_pretrained("test-scalr", device="cpu")
    model.save_pretrained(tmp_path / "copy")
    copy = scalr_zoo.WaffleIron.from_pretrained(tmp_path / "copy", device="cpu")
    assert copy.config == model.config
    original = scalr_zoo.read_original_checkpoint(DATA / "scalr_pretrained.pth")
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in original.items())
