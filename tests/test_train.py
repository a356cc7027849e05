"""Training support: drop-path, gradient checkpointing, heads, frozen backbone, lr decay, losses, metrics, fit()."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scalr_zoo
from scalr_zoo.labelled_scans import LabelledScan, find_labelled_scans, read_labelled_scan
from scalr_zoo.losses import lovasz_softmax, segmentation_loss
from scalr_zoo.metrics import SegmentationScores, confusion_matrix, per_class_iou
from scalr_zoo.model import _drop_path_keep
from scalr_zoo.preprocess import pack_clouds, prepare_cloud
from scalr_zoo.train import _warmup_cosine, fit, layer_decay_param_groups

from conftest import random_scan
from labelled_scenes import SCENE_GENERATORS, street_scene


def small_model(width: int = 32, depth: int = 2, norm: str = "layernorm", seed: int = 0) -> scalr_zoo.WaffleIron:
    torch.manual_seed(seed)
    return scalr_zoo.create_model({"width": width, "depth": depth, "norm": norm})


def packed_batch(model, clouds):
    cfg = model.config.preprocess
    prepared = [prepare_cloud(torch.from_numpy(c), cfg, model.config.arch.dim_proj) for c in clouds]
    packed, _ = pack_clouds(prepared, cfg.grids)
    return packed, prepared


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classif.")}


# --------------------------------------------------------------------------- metrics and losses


def test_iou_on_hand_made_confusion():
    # 4 classes; class 3 never occurs nor is predicted; label 255 is ignored.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 3, 1])
    conf = confusion_matrix(predicted, target, 4, ignore_index=255)
    expected = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(conf.numpy(), expected)
    # IoU = TP / (TP + FP + FN): class 0: 2/(2+1+1), class 1: 1/(1+1+1), class 2: 2/(2+1+1).
    iou = per_class_iou(conf)
    np.testing.assert_allclose(iou[:3], [0.5, 1 / 3, 0.5])
    assert math.isnan(iou[3])
    scores = SegmentationScores(("a", "b", "c", "d"), conf.numpy())
    assert scores.miou == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert scores.accuracy == pytest.approx(5 / 8)
    assert scores.num_points == 8
    assert scores.to_dict()["iou"]["d"] is None
    assert "mIoU" in scores.table()
    # A class predicted but absent from the labels scores 0, not NaN.
    assert per_class_iou(confusion_matrix(torch.tensor([3]), torch.tensor([0]), 4))[3] == 0.0
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)


def test_lovasz_softmax_equals_jaccard_loss_on_hard_predictions():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=gen)
    labels[labels == 3] = 2  # class 3 absent from the labels, but predicted sometimes
    predicted = torch.where(torch.rand(200, generator=gen) < 0.6, labels, torch.randint(0, 4, (200,), generator=gen))
    hard = F.one_hot(predicted, 4).float()
    iou = per_class_iou(confusion_matrix(predicted, labels, 4))
    present = torch.unique(labels).tolist()
    expected = float(np.mean([1 - iou[c] for c in present]))
    assert float(lovasz_softmax(hard, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(lovasz_softmax(F.one_hot(labels, 4).float(), labels)) == 0.0


def test_segmentation_loss_ignores_ignored_points():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 3, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    labels[:10] = 255
    changed = logits.clone()
    changed[:10] += 5 * torch.randn(10, 3, generator=gen)
    for weight in (0.0, 1.0):
        a = segmentation_loss(logits, labels, ignore_index=255, lovasz_weight=weight)
        b = segmentation_loss(changed, labels, ignore_index=255, lovasz_weight=weight)
        assert float(a) == pytest.approx(float(b))
    ce = F.cross_entropy(logits[10:], labels[10:])
    assert float(segmentation_loss(logits, labels, ignore_index=255)) == pytest.approx(float(ce))
    assert float(segmentation_loss(logits, torch.full((50,), 255), ignore_index=255, lovasz_weight=1.0)) == 0.0


# --------------------------------------------------------------------------- model switches


def test_reset_head_shapes_and_config():
    model = small_model()
    packed, _ = packed_batch(model, [random_scan(3000, seed=0)])
    model.reset_head(5, classes=["a", "b", "c", "d", "e"])
    assert model.config.arch.head == "bn_linear" and model.config.arch.out == 5
    assert model.config.classes == ("a", "b", "c", "d", "e")
    state = model.state_dict()
    assert state["classif.0.weight"].shape == (32,) and state["classif.0.running_mean"].shape == (32,)
    assert state["classif.1.weight"].shape == (5, 32, 1) and state["classif.1.bias"].shape == (5,)
    # The recipe's initialisation: zero classifier, so every logit starts at 0.
    logits = model(packed, head=True)
    assert logits.shape == (packed.features.shape[0], 5)
    assert torch.count_nonzero(logits) == 0
    assert not model.classif.training  # follows the model's (eval) mode
    rebuilt = scalr_zoo.WaffleIron(scalr_zoo.ModelConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())  # config and weights agree
    model.reset_head(3)
    assert model.config.classes is None and model.config.arch.out == 3
    with pytest.raises(ValueError, match="class names"):
        model.reset_head(4, classes=["a"])


def test_freeze_backbone_keeps_backbone_bit_identical():
    model = small_model(norm="batchnorm")  # BatchNorm in the backbone too: running stats must not move
    model.reset_head(4)
    model.freeze_backbone()
    model.train()
    assert model.backbone_frozen
    assert not any(m.training for m in model.embed.modules())
    assert not any(m.training for m in model.waffleiron.modules())
    assert model.classif.training
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("classif."))
    before = backbone_state(model)
    head_before = {k: v.clone() for k, v in model.classif.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        packed, prepared = packed_batch(model, [random_scan(2500, seed=seed)])
        labels = torch.randint(0, 4, (packed.features.shape[0],))
        loss = F.cross_entropy(model(packed, head=True), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = backbone_state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    head_after = model.classif.state_dict()
    assert not torch.equal(head_before["1.weight"], head_after["1.weight"])
    assert not torch.equal(head_before["0.running_mean"], head_after["0.running_mean"])

    model.unfreeze_backbone()
    assert not model.backbone_frozen and model.waffleiron.training
    assert all(p.requires_grad for p in model.parameters())


def test_training_step_lowers_the_loss():
    model = small_model()
    model.reset_head(3)
    model.train()
    packed, _ = packed_batch(model, [random_scan(3000, seed=2), random_scan(2000, seed=3)])
    # Labels the geometry determines: height classes.
    z = packed.features[:, 3]
    labels = (z > -1.6).long() + (z > 0.0).long()
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, lr=1e-2, weight_decay=0.0, layer_decay=0.9))
    before = backbone_state(model)

    def loss_now():
        return segmentation_loss(model(packed, head=True), labels, ignore_index=255, lovasz_weight=1.0)

    initial = float(loss_now().detach())
    for _ in range(5):
        loss = loss_now()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss_now().detach()) < 0.9 * initial
    key = "waffleiron.channel_mix.0.mlp.0.weight"
    assert not torch.equal(before[key], model.state_dict()[key])  # the backbone trains too


def test_layer_decay_groups_follow_the_recipe():
    depth, lr, decay, wd = 3, 1.0, 0.5, 0.05
    model = small_model(depth=depth)
    model.reset_head(4)
    groups = layer_decay_param_groups(model, lr=lr, weight_decay=wd, layer_decay=decay)
    seen = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in seen
            seen[id(p)] = (group["lr"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert len(seen) == len(names)
    for name, p in names.items():
        got_lr, got_wd = seen[id(p)]
        if name.startswith("embed."):
            want_lr = decay ** (depth + 1)
        elif name.startswith("waffleiron."):
            block = int(name.split(".")[2])
            want_lr = decay ** (depth - block)
        else:
            assert name.startswith("classif.")
            want_lr = 1.0
        assert got_lr == pytest.approx(lr * want_lr), name
        assert got_wd == (0.0 if p.ndim == 1 else wd), name
    # LayerScale weights are (C, 1, 1): decayed, as in the recipe.
    assert seen[id(names["waffleiron.spatial_mix.1.scale.weight"])] == (pytest.approx(decay**2), wd)
    # Frozen parameters are left out.
    model.freeze_backbone()
    frozen_groups = layer_decay_param_groups(model, lr=lr, weight_decay=wd, layer_decay=decay)
    assert sum(len(g["params"]) for g in frozen_groups) == len(list(model.classif.parameters()))
    assert {g["lr"] for g in frozen_groups} == {lr}


def test_warmup_cosine_schedule():
    factor = _warmup_cosine(warmup_steps=4, total_steps=14, min_factor=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)
    assert all(factor(s) > factor(s + 1) for s in range(4, 13))


def test_drop_path_only_in_training():
    model = small_model(depth=3)
    packed, _ = packed_batch(model, [random_scan(3000, seed=4), random_scan(2000, seed=5)])
    with torch.no_grad():
        model.train()
        assert torch.equal(model(packed), model(packed))  # no drop-path: training mode is deterministic
        for schedule, rates in (("linear", [0.0, 0.25, 0.5]), ("uniform", [0.5, 0.5, 0.5])):
            model.set_drop_path(0.0)
            model.eval()
            reference = model(packed)
            model.set_drop_path(0.5, schedule=schedule)
            assert model.drop_path_rates == rates
            assert torch.equal(model(packed), reference)
            model.train()
            state = copy.deepcopy(model.state_dict())  # training-mode calls move the embedding's BN statistics
            first, second = model(packed), model(packed)
            assert not torch.equal(first, second)
            model.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.set_drop_path(1.0)
    with pytest.raises(ValueError, match="schedule"):
        model.set_drop_path(0.1, schedule="cosine")


def test_drop_path_draws_once_per_cloud():
    torch.manual_seed(0)
    cloud_of_row = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    factors = torch.stack([_drop_path_keep(0.25, cloud_of_row, 3, torch.float32)[:, 0] for _ in range(2000)])
    for rows in ((0, 5), (5, 12), (12, 15)):
        block = factors[:, rows[0] : rows[1]]
        assert torch.equal(block, block[:, :1].expand_as(block))  # one draw per cloud
    values = factors.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert float(factors.mean()) == pytest.approx(1.0, abs=0.03)  # expectation kept


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_grad_checkpointing_gives_the_same_gradients(norm):
    plain = small_model(norm=norm, depth=3)
    plain.reset_head(3)
    plain.set_drop_path(0.3)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    packed, _ = packed_batch(plain, [random_scan(2500, seed=6), random_scan(2000, seed=7)])
    labels = torch.randint(0, 3, (packed.features.shape[0],), generator=torch.Generator().manual_seed(0))
    calls = []
    ckpt.waffleiron.spatial_mix[1].register_forward_hook(lambda *_: calls.append(1))
    for model in (plain, ckpt):
        model.train()
        model.classif[1].weight.data.normal_(generator=torch.Generator().manual_seed(1))
        torch.manual_seed(123)  # same drop-path draws
        F.cross_entropy(model(packed, head=True), labels).backward()
    assert len(calls) == 2  # forward + recomputation: checkpointing really ran
    # The same operations run in the same order: on CPU the gradients are bit-identical.
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.equal(q.grad, p.grad), name
    # BatchNorm running statistics moved once, as without checkpointing.
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- labelled scans


def test_reads_npz_and_semantickitti_layouts(tmp_path):
    points, labels = street_scene(0, num_points=2000)
    np.savez(tmp_path / "a.npz", points=points, labels=labels)
    seq = tmp_path / "sequences" / "00"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    points.tofile(seq / "velodyne" / "000000.bin")
    raw = labels.astype(np.uint32) * 10 + (np.arange(len(labels), dtype=np.uint32) << 16)  # instance ids on top
    raw.tofile(seq / "labels" / "000000.label")
    scans = find_labelled_scans(tmp_path)
    assert [s.name for s in scans] == ["a", "000000"]
    got_points, got_labels = read_labelled_scan(scans[0], num_classes=5)
    np.testing.assert_array_equal(got_points, points)
    np.testing.assert_array_equal(got_labels, labels)
    label_map = {10 * c: c for c in range(5)}
    got_points, got_labels = read_labelled_scan(scans[1], num_classes=5, label_map=label_map)
    np.testing.assert_array_equal(got_points, points)
    np.testing.assert_array_equal(got_labels, labels)
    # Raw ids missing from the map become the ignore index.
    _, partial = read_labelled_scan(scans[1], label_map={0: 0}, ignore_index=255)
    np.testing.assert_array_equal(partial, np.where(labels == 0, 0, 255))


def test_bad_labelled_scans_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_labelled_scans(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no labelled scan"):
        find_labelled_scans(tmp_path)
    points, labels = street_scene(0, num_points=500)
    np.savez(tmp_path / "bad.npz", points=points, labels=labels + 3)
    with pytest.raises(ValueError, match=r"bad\.npz.*outside \[0, 5\)"):
        read_labelled_scan(LabelledScan(tmp_path / "bad.npz"), num_classes=5)
    np.savez(tmp_path / "short.npz", points=points, labels=labels[:-1])
    with pytest.raises(ValueError, match=r"short\.npz.*one per point"):
        read_labelled_scan(LabelledScan(tmp_path / "short.npz"))
    np.savez(tmp_path / "nolabels.npz", points=points)
    with pytest.raises(ValueError, match=r"missing array\(s\) \['labels'\]"):
        read_labelled_scan(LabelledScan(tmp_path / "nolabels.npz"))
    points.tofile(tmp_path / "lonely.bin")
    with pytest.raises(ValueError, match=r"lonely\.bin has no labels"):
        find_labelled_scans(tmp_path)


# --------------------------------------------------------------------------- fit()


def write_scenes(folder, generator, seeds, **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        points, labels = generator(seed, **kwargs)
        np.savez(folder / f"scan_{seed:03d}.npz", points=points, labels=labels)


#: The synthetic scenes lie within 30 m: a +-32 m field of view (same 0.5 m cells, 128-cell grids) keeps the tests fast.
SMALL_FOV = ((-32.0, -32.0, -8.0), (32.0, 32.0, 8.0))


@pytest.mark.parametrize("scene", sorted(SCENE_GENERATORS))
def test_linear_probe_learns(tmp_path, scene):
    generator, classes = SCENE_GENERATORS[scene]
    write_scenes(tmp_path / "train", generator, range(4), num_points=8000)
    write_scenes(tmp_path / "val", generator, range(100, 102), num_points=8000)
    val_labels = np.concatenate([generator(s, num_points=8000)[1] for s in range(100, 102)])
    majority = np.bincount(val_labels).max() / len(val_labels)

    model = small_model(width=48, depth=4)
    before = backbone_state(model)
    result = fit(
        model, tmp_path / "train", mode="linear_probe", val_dir=tmp_path / "val", classes=classes,
        epochs=8, lr=5e-2, batch_size=1, augment=False, fov=SMALL_FOV, progress=False,
    )  # fmt: skip
    scores = result.scores
    assert result.evaluated_on == "val" and scores.num_points == len(val_labels)
    assert scores.classes == tuple(classes) and model.config.classes == tuple(classes)
    assert model.config.preprocess.grids == ((128, 128), (128, 32), (128, 32))  # the FOV override is kept
    # Chance: a majority-class guess scores `majority` accuracy and an mIoU of majority / K.
    assert scores.accuracy > majority + 0.2, scores.table()
    assert scores.miou > 3 * majority / len(classes), scores.table()
    assert result.history[-1].loss < result.history[0].loss
    after = backbone_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # linear probing left the backbone alone
    assert not model.training and model.backbone_frozen


def test_finetune_is_seeded_and_trains_everything(tmp_path):
    write_scenes(tmp_path / "train", street_scene, range(3), num_points=3000)
    runs = []
    for num_workers in (0, 2):  # the second run reads and preprocesses in 2 worker processes
        model = small_model(depth=2, seed=3)
        before = backbone_state(model)
        result = fit(
            model, tmp_path / "train", mode="finetune", epochs=2, batch_size=2, lr=1e-2,
            grad_checkpointing=True, fov=SMALL_FOV, num_workers=num_workers, progress=False, seed=7,
        )  # fmt: skip
        runs.append((model.state_dict(), result))
    (state_a, result_a), (state_b, result_b) = runs
    assert result_a.evaluated_on == "train" and len(result_a.history) == 2
    assert model.drop_path_rates == [0.2, 0.2]  # the recipe's uniform drop-path
    assert model.config.arch.out == 5  # inferred from the labels
    # Same seed, same shuffles, augmentations and drop-path draws, whatever the workers: bit-identical on CPU.
    assert result_a.to_dict() == result_b.to_dict()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert not torch.equal(before["embed.conv1.weight"], state_a["embed.conv1.weight"])


def test_fit_rejects_bad_options(tmp_path):
    write_scenes(tmp_path, street_scene, [0], num_points=500)
    model = small_model()
    with pytest.raises(ValueError, match="mode"):
        fit(model, tmp_path, mode="pretrain")
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        fit(model, tmp_path, num_classes=5, ignore_index=2)
    with pytest.raises(ValueError, match="new_head=False"):
        fit(model, tmp_path, num_classes=5, new_head=False)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        fit(model, tmp_path, num_classes=3, epochs=1, progress=False)
