"""The weights manifest against the facts of WAFFLEIRON_SPEC.md (sections 1 and 2), and
list_models / model_info / SCALR_ZOO_MANIFEST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import scalr_zoo
from scalr_zoo.registry import entry_for_archive, manifest_entries

ROOT = Path(__file__).resolve().parent.parent

A = "https://github.com/valeoai/ScaLR/releases/download/v0.1.0/"
B = "https://github.com/valeoai/ScaLR/releases/download/v0.2.0/"
C = "https://github.com/valeoai/WaffleIron/releases/download/v0.2.0/"

#: Spec, section 1: every released archive and its reported mIoU (None: no labels used).
RELEASES = {
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-pretrained.tar.gz": None,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-linear_probing-nuscenes.tar.gz": 67.8,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-linear_probing-kitti.tar.gz": 55.8,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-linear_probing-panda64.tar.gz": 37.9,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-linear_probing-pandagt.tar.gz": 34.5,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-finetuning-nuscenes-100p.tar.gz": 78.4,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-finetuning-kitti-100p.tar.gz": 65.8,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-finetuning-panda64-100p.tar.gz": 48.3,
    A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-finetuning-pandagt-100p.tar.gz": 41.1,
    A + "WI_768-no_pretraining-finetuning-nuscenes-100p.tar.gz": 78.7,
    B + "WI_768-ScaLR_plus-pretrained.tar.gz": None,
    B + "WI_768-ScaLR_plus-linear_probing-nuscenes.tar.gz": 70.4,
    B + "WI_768-ScaLR_plus-linear_probing-kitti.tar.gz": 61.0,
    B + "WI_768-ScaLR_plus-linear_probing-panda64.tar.gz": 43.5,
    B + "WI_768-ScaLR_plus-linear_probing-pandagt.tar.gz": 40.7,
    B + "WI_768-ScaLR_plus-finetuning-nuscenes-1p.tar.gz": 54.1,
    B + "WI_768-ScaLR_plus-finetuning-nuscenes-10p.tar.gz": 70.7,
    B + "WI_768-ScaLR_plus-finetuning-nuscenes-100p.tar.gz": 78.4,
    B + "WI_768-ScaLR_plus-finetuning-kitti-1p.tar.gz": 57.4,
    B + "WI_768-ScaLR_plus-finetuning-kitti-100p.tar.gz": 65.2,
    B + "WI_768-ScaLR_plus-finetuning-panda64-100p.tar.gz": 50.7,
    B + "WI_768-ScaLR_plus-finetuning-pandagt-100p.tar.gz": 44.0,
    C + "waffleiron_nuscenes.tar.gz": 77.6,
    C + "waffleiron_kitti.tar.gz": 68.0,
}
INTENSITY = {
    "nuscenes": (18.742355, 22.04632),
    "kitti": (0.28613698, 0.14090556),
    "panda64": (18.23640649, 25.86983417),
    "pandagt": (23.06113565, 16.76273235),
}
CLASS_COUNTS = {"nuscenes": 16, "kitti": 19, "panda64": 17, "pandagt": 17}
FIRST_LAST_CLASS = {"nuscenes": ("barrier", "vegetation"), "kitti": ("car", "traffic-sign"), "panda64": ("road", "driveway")}


def dataset_of(filename: str) -> str | None:
    for token in ("nuscenes", "kitti", "panda64", "pandagt"):
        if f"-{token}" in filename or f"_{token}" in filename:
            return token
    return None


def test_manifest_ships_an_identical_copy_in_the_package():
    root, packaged = ROOT / "weights_manifest.json", ROOT / "scalr_zoo" / "weights_manifest.json"
    assert root.read_bytes() == packaged.read_bytes(), "cp weights_manifest.json scalr_zoo/weights_manifest.json"


def test_all_24_releases_are_registered_without_invented_hub_copies(monkeypatch):
    monkeypatch.delenv("SCALR_ZOO_MANIFEST", raising=False)
    entries = manifest_entries()
    assert len(entries) == 24
    assert {e.archive_url for e in entries.values()} == set(RELEASES)
    assert all(e.hub is None and e.archive_sha256 is None for e in entries.values())
    scalr = scalr_zoo.model_info("waffleiron-dinov2-L")
    assert scalr.archive_url == A + "WI_768-DINOv2_ViT_L_14-NS_KI_PD-pretrained.tar.gz"
    assert (scalr.family, scalr.teacher, scalr.task) == ("scalr", "dinov2-vitl14", "distillation")
    assert scalr.sensors == ("nuscenes", "semantickitti", "pandar64", "pandargt")


@pytest.mark.parametrize("url", sorted(RELEASES))
def test_entry_matches_the_spec(url, monkeypatch):
    monkeypatch.delenv("SCALR_ZOO_MANIFEST", raising=False)
    filename = url.rsplit("/", 1)[1]
    entry = entry_for_archive(filename)
    assert entry is not None and entry.archive_url == url
    assert entry.miou == RELEASES[url]
    assert scalr_zoo.model_info(filename[: -len(".tar.gz")]) is entry, "the archive stem is an alias"
    arch, pre = entry.config.arch, entry.config.preprocess
    dataset = dataset_of(filename)
    assert arch.depth == 48 and pre.voxel_size == 0.1 and pre.num_neighbors == 16 and arch.dim_proj == (2, 1, 0)
    if filename.startswith("waffleiron_"):  # supervised WaffleIron
        assert (arch.norm, arch.act, arch.head) == ("batchnorm", "relu", "linear")
        assert (pre.intensity_mean, pre.intensity_std) == (0.0, 1.0)
        if dataset == "nuscenes":
            assert arch.width == 384
            assert pre.fov == ((-50, -50, -5), (50, 50, 5)) and pre.grids == ((166, 166), (166, 16), (166, 16))
        else:
            assert arch.width == 256
            assert pre.fov == ((-50, -50, -3), (50, 50, 2)) and pre.grids == ((250, 250), (250, 12), (250, 12))
    else:
        plus = "ScaLR_plus" in filename
        assert arch.width == 768 and arch.norm == "layernorm"
        assert arch.act == ("gelu" if plus else "relu")
        if filename.endswith("-pretrained.tar.gz"):
            assert arch.out == 1024 and entry.classes is None
            assert (arch.head, arch.hidden) == (("mlp", 2048) if plus else ("linear", None))
            assert (pre.intensity_mean, pre.intensity_std) == INTENSITY["nuscenes"]
        else:
            assert arch.head == "bn_linear"
            assert (pre.intensity_mean, pre.intensity_std) == INTENSITY[dataset]
        if dataset == "panda64" or (dataset == "pandagt" and "linear_probing" in filename):
            assert pre.fov == ((-128, -128, -8), (128, 128, 8)) and pre.grids == ((512, 512), (512, 32), (512, 32))
        elif dataset == "pandagt":
            assert pre.fov == ((-96, -96, -8), (96, 96, 8)) and pre.grids == ((384, 384), (384, 32), (384, 32))
        else:
            assert pre.fov == ((-64, -64, -8), (64, 64, 8)) and pre.grids == ((256, 256), (256, 32), (256, 32))
    if entry.classes is not None:
        assert len(entry.classes) == CLASS_COUNTS[dataset] == arch.out
        if dataset in FIRST_LAST_CLASS:
            assert (entry.classes[0], entry.classes[-1]) == FIRST_LAST_CLASS[dataset]
    if filename.endswith("p.tar.gz"):
        assert entry.data_fraction == int(filename.rsplit("-", 1)[1][:-len("p.tar.gz")]) / 100


def spec_state_shapes(width: int, depth: int, norm: str, head: str, out: int | None, hidden: int | None) -> dict:
    """State-dict names and shapes of spec section 2."""
    c = width
    shapes: dict[str, tuple[int, ...]] = {}

    def batchnorm(prefix: str, n: int) -> None:
        shapes.update({f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    batchnorm("embed.norm", 5)
    shapes.update({"embed.conv1.weight": (c, 5, 1), "embed.conv1.bias": (c,)})
    batchnorm("embed.conv2.0", 5)
    shapes["embed.conv2.1.weight"] = (c, 5, 1, 1)
    batchnorm("embed.conv2.2", c)
    shapes["embed.conv2.4.weight"] = (c, c, 1, 1)
    shapes.update({"embed.final.weight": (c, 2 * c, 1), "embed.final.bias": (c,)})
    for d in range(depth):
        for mix, layer, kernel in (("channel_mix", "mlp", (c, c, 1)), ("spatial_mix", "ffn", (c, 1, 3, 3))):
            prefix = f"waffleiron.{mix}.{d}"
            if norm == "layernorm":
                shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
            else:
                batchnorm(f"{prefix}.norm", c)
            for i in (0, 2):
                shapes.update({f"{prefix}.{layer}.{i}.weight": kernel, f"{prefix}.{layer}.{i}.bias": (c,)})
            shapes[f"{prefix}.scale.weight"] = (c, 1, 1)
    if head == "linear":
        shapes.update({"classif.weight": (out, c, 1), "classif.bias": (out,)})
    elif head == "mlp":
        shapes.update({"classif.0.weight": (hidden, c, 1), "classif.0.bias": (hidden,)})
        shapes.update({"classif.2.weight": (out, hidden, 1), "classif.2.bias": (out,)})
    elif head == "bn_linear":
        batchnorm("classif.0", c)
        shapes.update({"classif.1.weight": (out, c, 1), "classif.1.bias": (out,)})
    return shapes


MANIFEST_NAMES = [m["name"] for m in json.loads((ROOT / "weights_manifest.json").read_text())["models"]]


@pytest.mark.parametrize("name", MANIFEST_NAMES)
def test_every_entry_builds_the_spec_architecture(name, monkeypatch):
    monkeypatch.delenv("SCALR_ZOO_MANIFEST", raising=False)
    entry = scalr_zoo.model_info(name)
    with torch.device("meta"):
        model = scalr_zoo.WaffleIron(entry.model_config())
    arch = entry.config.arch
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == spec_state_shapes(arch.width, arch.depth, arch.norm, arch.head, arch.out, arch.hidden)
    if entry.name == "waffleiron-dinov2-L":
        assert sum(v.numel() for v in model.state_dict().values()) == 60_224_555  # spec, section 2


def test_list_models_patterns_and_filters(monkeypatch):
    monkeypatch.delenv("SCALR_ZOO_MANIFEST", raising=False)
    assert len(scalr_zoo.list_models()) == 24
    assert scalr_zoo.list_models() == sorted(scalr_zoo.list_models())
    assert scalr_zoo.list_models("waffleiron-dinov2-L-lp-*") == [
        "waffleiron-dinov2-L-lp-kitti",
        "waffleiron-dinov2-L-lp-nuscenes",
        "waffleiron-dinov2-L-lp-pandar64",
        "waffleiron-dinov2-L-lp-pandargt",
    ]
    assert scalr_zoo.list_models("*scalr_plus-finetuning*") == scalr_zoo.list_models("waffleiron-scalrplus-ft-*")
    assert len(scalr_zoo.list_models("waffleiron-scalrplus-ft-*")) == 7
    assert scalr_zoo.list_models(task="distillation") == ["waffleiron-dinov2-L", "waffleiron-scalrplus"]
    assert scalr_zoo.list_models(family="waffleiron") == ["waffleiron-48-256-kitti", "waffleiron-48-384-nuscenes"]
    kitti = scalr_zoo.list_models(dataset="kitti")
    assert kitti == scalr_zoo.list_models(dataset="semantickitti") and len(kitti) == 6
    assert scalr_zoo.list_models("*-ft-*", dataset=["pandar64", "pandagt"], family="scalr-plus") == [
        "waffleiron-scalrplus-ft-pandar64-100p",
        "waffleiron-scalrplus-ft-pandargt-100p",
    ]
    assert scalr_zoo.list_models(data_fraction=0.01) == ["waffleiron-scalrplus-ft-kitti-1p", "waffleiron-scalrplus-ft-nuscenes-1p"]
    assert scalr_zoo.list_models(sensors="pandargt", task="distillation") == ["waffleiron-dinov2-L", "waffleiron-scalrplus"]
    assert scalr_zoo.list_models("nothing*") == []
    with pytest.raises(ValueError, match="cannot filter on \\['colour'\\]"):
        scalr_zoo.list_models(colour="red")


def test_model_info_names_aliases_and_errors(monkeypatch):
    monkeypatch.delenv("SCALR_ZOO_MANIFEST", raising=False)
    assert scalr_zoo.model_info("SCALR").name == "waffleiron-dinov2-L"
    assert scalr_zoo.model_info("scalr-plus").name == "waffleiron-scalrplus"
    assert scalr_zoo.model_info("WAFFLEIRON-DINOV2-L-FT-KITTI-100P").name == "waffleiron-dinov2-L-ft-kitti-100p"
    with pytest.raises(KeyError, match="Did you mean 'waffleiron-dinov2-L-ft-kitti-100p'"):
        scalr_zoo.model_info("waffleiron-dinov2-L-ft-kitti-10p")
    config = scalr_zoo.model_info("waffleiron-48-384-nuscenes").model_config()
    assert config.name == "waffleiron-48-384-nuscenes"
    assert config.meta["miou"] == 77.6 and config.meta["paper"] == "https://arxiv.org/abs/2301.10100"
    assert config.classes[:2] == ("barrier", "bicycle")


def write_manifest(path: Path, models: list) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models}), encoding="utf-8")
    return path


def small_entry(name: str, **changes) -> dict:
    entry = scalr_zoo.model_info("waffleiron-48-256-kitti").to_dict()
    entry.update({"name": name, "aliases": [], **changes})
    return entry


def test_extra_manifest_adds_and_replaces_entries(tmp_path, monkeypatch):
    extra = write_manifest(
        tmp_path / "extra.json",
        [small_entry("my-private-model", aliases=["mine"]), small_entry("waffleiron-48-256-kitti", miou=1.0)],
    )
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(extra))
    assert scalr_zoo.model_info("mine").name == "my-private-model"
    assert scalr_zoo.model_info("waffleiron-48-256-kitti").miou == 1.0
    assert len(scalr_zoo.list_models()) == 25
    # Read at each call: edits and removals of the variable apply at once.
    write_manifest(extra, [small_entry("my-other-model")])
    assert "my-other-model" in scalr_zoo.list_models() and "my-private-model" not in scalr_zoo.list_models()
    monkeypatch.delenv("SCALR_ZOO_MANIFEST")
    assert len(scalr_zoo.list_models()) == 24


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("x", {"colour": "red"}, "entry x: unknown keys \\['colour'\\]"),
        ("bad/name", {}, "must be letters, digits"),
        ("x", {"archive": {"url": "https://github.com/o/r/../..", "sha256": None}}, "ending in a file name"),
        ("x", {"archive": {"url": "https://github.com/a/b.tar.gz", "sha256": "abc"}}, "64 lowercase hex"),
        ("x", {"hub": {"repo_id": "o/r", "revision": "main", "files": {}}}, "sha256 of model.safetensors"),
        ("x", {"aliases": ["scalr"]}, "'scalr' is claimed by both"),
        ("x", {"config": {"architecture": {"width": 8, "head": "nope"}}}, "entry x: head must be one of"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, monkeypatch, name, changes, message):
    models = [small_entry(name, **changes)]
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(write_manifest(tmp_path / "bad.json", models)))
    with pytest.raises(ValueError, match=message):
        scalr_zoo.list_models()


def test_missing_or_unreadable_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        scalr_zoo.list_models()
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="cannot read the weights manifest"):
        scalr_zoo.list_models()
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(write_manifest(tmp_path / "partial.json", [{"name": "x"}])))
    with pytest.raises(ValueError, match="entry x: missing keys"):
        scalr_zoo.list_models()


def test_config_may_name_a_registry_entry(tmp_path, monkeypatch):
    from conftest import DATA, load_case

    entry = small_entry("small-kitti", config=scalr_zoo.ModelConfig.from_dict(load_case("waffleiron_kitti").config).to_dict())
    monkeypatch.setenv("SCALR_ZOO_MANIFEST", str(write_manifest(tmp_path / "m.json", [entry])))
    model = scalr_zoo.load(DATA / "waffleiron_kitti.pth", config="small-kitti", device="cpu", sensor="raw")
    assert model.config.name == "small-kitti" and model.config.arch.width == 32
    assert model.config.meta["archive_url"] == entry["archive"]["url"]
