"""Bidirectional Copy-Paste (``bcp``): the cuboid, the two mixing directions with their labels,
the loss over labeled and unlabeled voxels and its weight, the teacher's pseudo-labels, the
stage switch and the teacher's start, and training through the command line on real cases."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from backend_helpers import run_cli, tiny_set_arguments
from SemiSupSegLib import method_catalogue
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.methods import create_method, list_methods, method_class
from SemiSupSegLib.backend.methods.base import segmentation_loss
from SemiSupSegLib.backend.methods.copy_paste import (
    PRE_TRAINING,
    SELF_TRAINING,
    CopyPasteOptions,
    MaskedSegmentationLoss,
    bidirectional_mix,
    copy_paste_loss,
    cuboid_mask,
    largest_components,
)
from SemiSupSegLib.protocol import EXIT_FAILED, EXIT_OK

CPU = torch.device("cpu")
SMALL_UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def _config(**settings) -> TrainConfig:
    base = {
        "method": "bcp",
        "iterations": 10,
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "feature_channels": 8,
        "network_options": SMALL_UNET,
    }
    return TrainConfig.from_dict({**base, **settings})


def _crop(tensor: torch.Tensor, cuboid: torch.Tensor) -> torch.Tensor:
    """The voxels of ``tensor`` (N, C, ...) inside the cuboid ``cuboid`` (1, 1, ...), as a box."""
    index = cuboid[0, 0].nonzero()
    low, high = index.min(0).values, index.max(0).values + 1
    return tensor[(..., *(slice(int(a), int(b)) for a, b in zip(low, high)))]


def test_registered_with_the_catalogue_options():
    assert "bcp" in list_methods()
    cls = method_class("bcp")
    entry = method_catalogue.method_info("bcp")
    assert cls.uses_unlabeled and entry.uses_unlabeled and not entry.needs_2d_encoder
    fields = dataclasses.fields(CopyPasteOptions)
    assert [o.name for o in entry.options] == [f.name for f in fields]
    assert [o.default for o in entry.options] == [f.default for f in fields]


def test_cuboid_is_two_thirds_of_each_side_and_fits():
    centred = cuboid_mask((16, 12, 9), 2 / 3, "centre")
    assert centred.shape == (1, 1, 16, 12, 9) and centred.dtype == torch.bool
    assert int(centred.sum()) == 10 * 8 * 6
    assert _crop(centred, centred).all()  # one box
    assert centred[0, 0, 3:13, 2:10, 1:7].all()  # (16-10)//2, (12-8)//2, (9-6)//2
    torch.manual_seed(0)
    starts = set()
    for _ in range(50):
        mask = cuboid_mask((16, 12, 9), 2 / 3)
        assert int(mask.sum()) == 480 and _crop(mask, mask).all()
        starts.add(tuple(int(v) for v in mask[0, 0].nonzero().min(0).values))
    assert len(starts) > 10  # a new place every draw
    assert all(0 <= x <= 6 and 0 <= y <= 4 and 0 <= z <= 3 for x, y, z in starts)


def test_mixing_puts_labeled_voxels_outside_and_unlabeled_inside_then_the_reverse():
    n, size = 4, (8, 8, 8)
    image_l = (10.0 + torch.arange(n)).view(n, 1, 1, 1, 1).expand(n, 1, *size)
    image_u = (20.0 + torch.arange(n)).view(n, 1, 1, 1, 1).expand(n, 1, *size)
    label_l = torch.ones(n, 1, *size, dtype=torch.int64)
    pseudo_u = torch.full((n, 1, *size), 2, dtype=torch.int64)
    cuboid = cuboid_mask(size, 0.5, "centre")
    inside = cuboid.expand(1, 1, *size)[0, 0]

    mixed = bidirectional_mix(image_l, label_l, image_u, pseudo_u, cuboid)
    assert mixed.split == 2 and mixed.images.shape == (n, 1, *size)
    for i in range(2):  # labeled patch i outside, unlabeled patch i inside
        assert (mixed.images[i, 0][~inside] == 10 + i).all()
        assert (mixed.images[i, 0][inside] == 20 + i).all()
        assert (mixed.labels[i, 0][~inside] == 1).all() and (mixed.labels[i, 0][inside] == 2).all()
        assert torch.equal(mixed.from_labeled[i, 0], ~inside)
    for i in range(2, n):  # unlabeled patch i outside, labeled patch i inside
        assert (mixed.images[i, 0][~inside] == 20 + i).all()
        assert (mixed.images[i, 0][inside] == 10 + i).all()
        assert (mixed.labels[i, 0][~inside] == 2).all() and (mixed.labels[i, 0][inside] == 1).all()
        assert torch.equal(mixed.from_labeled[i, 0], inside)
    # Wherever a voxel's label is the ground truth, its image comes from a labeled patch.
    assert torch.equal(mixed.from_labeled, mixed.images < 20)
    assert torch.equal(mixed.from_labeled, mixed.labels == 1)

    odd = bidirectional_mix(image_l[:3], label_l[:3], image_u[:3], pseudo_u[:3], cuboid)
    assert odd.split == 2 and odd.images.shape[0] == 3
    with pytest.raises(ValueError, match="2 labeled and 3 unlabeled"):
        bidirectional_mix(image_l[:2], label_l[:2], image_u[:3], pseudo_u[:3], cuboid)


def test_masked_loss_over_a_cuboid_is_the_runs_loss_on_the_cuboid_cut_out():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 10, 8, generator=generator)
    label = torch.randint(0, 3, (2, 1, 12, 10, 8), generator=generator)
    cuboid = cuboid_mask((12, 10, 8), 2 / 3, "centre")
    masked = MaskedSegmentationLoss(3)(logits, label, cuboid.expand(2, 1, 12, 10, 8))
    expected = segmentation_loss()(_crop(logits, cuboid), _crop(label, cuboid))
    assert float(masked) == pytest.approx(float(expected), rel=1e-5)
    whole = MaskedSegmentationLoss(3)(logits, label, torch.ones_like(label, dtype=torch.bool))
    assert float(whole) == pytest.approx(float(segmentation_loss()(logits, label)), rel=1e-5)


def test_the_voxels_from_unlabeled_patches_weigh_unlabeled_weight():
    """Logits right on the voxels from labeled patches and wrong on those from unlabeled ones:
    the labeled part is near 0, the unlabeled part is the loss on exactly those voxels, and
    the total adds it at the given weight."""
    n, size = 4, (12, 10, 8)
    generator = torch.Generator().manual_seed(1)
    label_l = torch.randint(0, 2, (n, 1, *size), generator=generator)
    pseudo_u = torch.randint(0, 2, (n, 1, *size), generator=generator)
    image = torch.zeros(n, 1, *size)
    cuboid = cuboid_mask(size, 2 / 3, "centre")
    mixed = bidirectional_mix(image, label_l, image, pseudo_u, cuboid)
    target = torch.nn.functional.one_hot(mixed.labels[:, 0], 2).movedim(-1, 1).float()
    logits = torch.where(mixed.from_labeled, 20.0 * target - 10.0, 10.0 - 20.0 * target)

    loss = MaskedSegmentationLoss(2)
    total, labeled, unlabeled = copy_paste_loss(loss, logits, mixed, 0.5)
    assert float(labeled) < 1e-3
    # First half: the unlabeled voxels are the cuboid; second half: the rest of the patch.
    first = segmentation_loss()(_crop(logits[:2], cuboid), _crop(mixed.labels[:2], cuboid))
    second = loss(logits[2:], mixed.labels[2:], ~cuboid.expand(2, 1, *size))
    assert float(unlabeled) == pytest.approx(float(first + second), rel=1e-5)
    assert float(unlabeled) > 10
    assert float(total) == pytest.approx(float(labeled) + 0.5 * float(unlabeled), rel=1e-6)
    heavier, _, _ = copy_paste_loss(loss, logits, mixed, 1.0)
    assert float(heavier - total) == pytest.approx(0.5 * float(unlabeled), rel=1e-5)
    ignored, _, _ = copy_paste_loss(loss, logits, mixed, 0.0)
    assert float(ignored) == pytest.approx(float(labeled), abs=1e-6)


def test_pseudo_labels_keep_the_largest_component_of_each_class():
    labels = torch.zeros(2, 1, 12, 12, 12, dtype=torch.int64)
    labels[0, 0, 1:6, 1:6, 1:6] = 1  # 125 voxels
    labels[0, 0, 9:11, 9:11, 9:11] = 1  # 8 voxels, apart: removed
    labels[0, 0, 8:10, 1:3, 1:3] = 2  # the only class-2 component: kept
    labels[1, 0, 2:4, 2:4, 2:4] = 1  # another patch, its own largest component
    kept = largest_components(labels, 3)
    assert type(kept) is torch.Tensor and kept.dtype == torch.int64
    expected = labels.clone()
    expected[0, 0, 9:11, 9:11, 9:11] = 0
    assert torch.equal(kept, expected)


def test_the_stage_switches_at_the_pretrain_fraction():
    method = create_method(_config(iterations=1500, batch_size=4), 3, CPU)
    assert method.stage1 == 450  # 0.3 of 1500
    assert [method.stage(i) for i in (0, 449, 450, 1499)] == [PRE_TRAINING] * 2 + [
        SELF_TRAINING
    ] * 2
    assert method.batch_composition(449) == (4, 0) and method.batch_composition(450) == (4, 4)
    published = create_method(
        _config(iterations=17000, method_options={"pretrain_fraction": 2000 / 17000}),
        3,
        CPU,
    )
    assert published.stage1 == 2000
    with pytest.raises(ConfigError, match="leaves no self-training iterations out of 2"):
        create_method(_config(iterations=2, method_options={"pretrain_fraction": 0.9}), 3, CPU)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        create_method(_config(batch_size=1), 3, CPU)


def _batch(n: int, labeled: bool) -> dict:
    generator = torch.Generator().manual_seed(n + int(labeled))
    image = torch.randn(n, 1, 16, 16, 16, generator=generator)
    if not labeled:
        return {"image": image}
    label = torch.zeros(n, 1, 16, 16, 16, dtype=torch.int64)
    label[:, :, 4:12, 4:10, 5:11] = 1
    label[:, :, 4:12, 10:13, 5:11] = 2
    return {"image": image + label.float(), "label": label}


def test_the_teacher_starts_from_the_pretrained_student_and_follows_it():
    torch.manual_seed(0)
    method = create_method(_config(iterations=4, method_options={"pretrain_fraction": 0.5}), 3, CPU)
    initial = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    for iteration in range(2):  # pre-training: the teacher is not used
        method.train_step(_batch(2, True), None, iteration)
    assert not method.teacher_started
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in initial.items())
    pretrained = {k: v.clone() for k, v in method.student.state_dict().items()}

    result = method.train_step(_batch(2, True), _batch(2, False), 2)
    assert method.teacher_started and result.info["n_unlabeled"] == 2
    assert set(result.losses) == {"loss", "labeled", "unlabeled"}
    student = method.student.state_dict()
    moved = [k for k in student if not torch.equal(student[k], pretrained[k])]
    assert len(moved) > len(student) // 2  # the step trained the student
    for name, value in method.teacher.state_dict().items():  # one EMA step from the student
        expected = 0.99 * pretrained[name] + 0.01 * student[name]
        assert torch.allclose(value, expected, atol=1e-6), name

    resumed = create_method(method.config, 3, CPU)  # a checkpoint knows the teacher started
    resumed.load_state_dict(method.state_dict())
    assert resumed.teacher_started
    teacher = {k: v.clone() for k, v in resumed.teacher.state_dict().items()}
    resumed.train_step(_batch(2, True), _batch(2, False), 3)  # the EMA goes on, no restart
    name = moved[0]
    expected = 0.99 * teacher[name] + 0.01 * resumed.student.state_dict()[name]
    assert torch.allclose(resumed.teacher.state_dict()[name], expected, atol=1e-6)
    assert not torch.allclose(teacher[name], student[name], atol=1e-6)


@pytest.fixture
def real_cases(hippocampus_dir, tmp_path):
    """Two labeled and two unlabeled hippocampus cases, as --images/--labels/--labeled."""
    folder = tmp_path / "data"
    for kind in ("images", "labels"):
        (folder / kind).mkdir(parents=True)
    names = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
    for name in names:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{name}.nii.gz", folder / "images")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{name}.nii.gz", folder / "labels")
    (folder / "labeled.txt").write_text("\n".join(names[:2]) + "\n")
    return folder


def test_trains_through_the_command_line_and_is_refused_without_unlabeled(real_cases, tmp_path):
    train = ["train", "--images", real_cases / "images", "--labels", real_cases / "labels",
             "--method", "bcp", "--device", "cpu", "--iterations", 6, *tiny_set_arguments(),
             "--set", "batch_size=2", "--set", "method.pretrain_fraction=0.5"]  # fmt: skip
    code, events = run_cli(train + ["--out", tmp_path / "refused"], tmp_path / "events.jsonl")
    assert code == EXIT_FAILED and "'bcp' learns from unlabeled images" in events[-1]["message"]

    train += ["--labeled", real_cases / "labeled.txt", "--out", tmp_path / "run"]
    code, events = run_cli(train, tmp_path / "events.jsonl")
    assert code == EXIT_OK, events[-1]
    stages = [(e["stage"], e.get("iteration")) for e in events if e["event"] == "stage"]
    assert stages[-2:] == [(PRE_TRAINING, 0), (SELF_TRAINING, 3)]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["metrics"]["n_unlabeled"] for e in progress] == [0, 0, 0, 2, 2, 2]
    assert all(e["metrics"]["n_labeled"] == 2 for e in progress)
    for e in progress[3:]:
        assert all(math.isfinite(e["loss"][k]) for k in ("loss", "labeled", "unlabeled"))
        assert 0 <= e["metrics"]["pseudo_foreground"] <= 1
    assert (tmp_path / "run" / "model.pt").is_file()
