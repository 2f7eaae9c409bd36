"""Planning from the data: fingerprint, plan per device budget, CLI and run-folder output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from SemiSupSegLib.backend.datasets import load_dataset, with_labeled_subset
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.fingerprint import Fingerprint, fingerprint_dataset
from SemiSupSegLib.backend.memory import measure
from SemiSupSegLib.backend.networks import create_network, network_divisors
from SemiSupSegLib.backend.planning import (
    MEMORY_SHARE,
    DeviceBudget,
    device_budget,
    make_plan,
    plan_training,
    pools_per_axis,
)
from SemiSupSegLib.backend.preprocessing import normalize_intensity
from SemiSupSegLib.output_layout import MODEL_FILE, PLAN_FILE

CPU = device_budget(torch.device("cpu"))
GPU_24GB = DeviceBudget("cuda", memory_bytes=24 * 2**30)


def fingerprint_like(size, spacing, cases=80, modality="MR", intensity=None) -> Fingerprint:
    return Fingerprint(
        sizes=(tuple(size),) * cases,
        spacings=(tuple(spacing),) * cases,
        orientations={"RAI": cases},
        foreground_extent_mm=(50.0, 50.0, 40.0),
        class_shares={0: 0.95, 1: 0.05},
        foreground_intensity=intensity or {},
        modality=modality,
    )


@pytest.fixture(scope="module")
def unet_memory():
    return measure(create_network("unet", 2), (32, 32, 32))


def hippocampus_subset(hippocampus_dir: Path, labeled: int = 6, unlabeled: int = 6):
    dataset = load_dataset(hippocampus_dir)
    names = [c.name for c in dataset.labeled]
    dataset = with_labeled_subset(dataset, names[:labeled])
    return replace(dataset, unlabeled=dataset.unlabeled[:unlabeled])


def test_hippocampus_plan_is_the_cpu_preset(hippocampus_dir):
    dataset = hippocampus_subset(hippocampus_dir)
    fingerprint = fingerprint_dataset(dataset)
    assert len(fingerprint.sizes) == 12
    assert set(fingerprint.class_shares) == {0, 1, 2}
    assert abs(sum(fingerprint.class_shares.values()) - 1) < 1e-9
    plan = make_plan(fingerprint, CPU, network="unet")
    assert plan.values["patch_size"] == [32, 48, 32]
    assert plan.values["batch_size"] == 4
    assert plan.values["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan.values["iterations"] == 1500


def test_large_volumes_on_a_cpu_trade_resolution_for_context(unet_memory):
    la_like = fingerprint_like((190, 142, 88), (0.625, 0.625, 0.625))
    cpu = make_plan(la_like, CPU, memory=unet_memory)
    spacing = np.array(cpu.values["target_spacing"])
    assert np.all(spacing > 0.625 * 1.5)
    median_shape = np.array([190, 142, 88]) * 0.625 / spacing
    patch = np.array(cpu.values["patch_size"])
    assert np.all(patch <= median_shape + 1e-6), "a patch is never larger than the volume"
    assert np.prod(patch) * cpu.values["batch_size"] <= 1.2 * CPU.voxels_per_iteration
    assert "resampled back" in cpu.reasons["target_spacing"]
    # The same data on a 24 GB GPU keeps the native spacing and fits the memory.
    gpu = make_plan(la_like, GPU_24GB, memory=unet_memory)
    assert gpu.values["target_spacing"] == [0.625, 0.625, 0.625]
    assert np.prod(gpu.values["patch_size"]) > 4 * np.prod(patch)
    assert gpu.values["batch_size"] >= 2
    assert gpu.values["iterations"] == 6000
    assert gpu.estimated_memory_gib * 2**30 <= MEMORY_SHARE * GPU_24GB.memory_bytes


def test_a_gpu_plan_fits_the_methods_largest_step(unet_memory):
    """mn with unlabeled_mode=add ends with a second batch of unlabeled patches on top of the
    labeled one; with replace, and supervised training, a step holds one batch; a GPU plan
    fits the largest step in its share of the memory."""
    from SemiSupSegLib.backend.config import TrainConfig
    from SemiSupSegLib.backend.methods import method_class, method_options

    def peak(method: str, **options) -> float:
        config = TrainConfig.from_dict({"method": method, "method_options": options})
        return method_class(method).peak_patches_per_step(method_options(config))

    assert peak("mn") == peak("bcp") == 2.0
    assert peak("mean-teacher") == peak("em") == 1.5  # half a batch of unlabeled on top
    assert peak("mn", unlabeled_mode="replace") == peak("supervised") == 1.0
    assert peak("ua-mt", unlabeled_batch=0) == peak("mn+em") == 1.0
    la_like = fingerprint_like((190, 142, 88), (0.625, 0.625, 0.625))
    small_gpu = DeviceBudget("cuda", memory_bytes=4 * 2**30)  # where memory limits the patch
    one, two = (
        make_plan(la_like, small_gpu, memory=unet_memory, patches_per_step=p) for p in (1, 2)
    )
    assert (
        np.prod(two.values["patch_size"]) * two.values["batch_size"]
        < np.prod(one.values["patch_size"]) * one.values["batch_size"]
    )
    for plan, patches in ((one, 1), (two, 2)):
        step = unet_memory.training_bytes(
            int(np.prod(plan.values["patch_size"])), plan.values["batch_size"] * patches, True
        )
        assert step <= MEMORY_SHARE * small_gpu.memory_bytes


def test_a_chosen_spacing_is_kept_and_the_patch_planned_for_it(unet_memory):
    la_like = fingerprint_like((190, 142, 88), (0.625, 0.625, 0.625))
    plan = make_plan(la_like, CPU, memory=unet_memory, spacing=(1.0, 1.0, 1.0))
    assert plan.values["target_spacing"] == [1.0, 1.0, 1.0]
    coarse = make_plan(la_like, CPU, memory=unet_memory, spacing=(2, 2, 2))
    assert np.prod(coarse.values["patch_size"]) <= np.prod(plan.values["patch_size"])


def test_anisotropic_data_keeps_its_coarse_axis_and_pools_it_less():
    spacings = [(0.7, 0.7, 5.0)] * 9 + [(0.7, 0.7, 1.5)]
    fingerprint = replace(
        fingerprint_like((512, 512, 40), (0.7, 0.7, 5.0), cases=10), spacings=tuple(spacings)
    )
    plan = make_plan(fingerprint, CPU)
    x, y, z = plan.values["target_spacing"]
    assert x == y and z > 3 * x
    pools = pools_per_axis(plan.values["patch_size"])
    patch = plan.values["patch_size"]
    for size, count in zip(patch, pools):
        assert size / 2**count >= 4, "the bottleneck keeps at least 4 voxels per axis"


def test_planned_unet_trains_on_its_patch():
    plan = make_plan(fingerprint_like((190, 142, 88), (0.625,) * 3), CPU)
    options = plan.values["network_options"]
    network = create_network("unet", 2, **options)
    patch = plan.values["patch_size"]
    divisors = network_divisors("unet", options)
    assert all(s % d == 0 for s, d in zip(patch, divisors))
    x = torch.randn(1, 1, *reversed(patch))
    assert network(x).shape == (1, 2, *reversed(patch))
    bottleneck = [s // d for s, d in zip(patch, divisors)]
    assert min(bottleneck) >= 4


def test_ct_is_clipped_and_z_scored_with_foreground_statistics():
    stats = {
        "percentile_00_5": -100.0,
        "median": 40,
        "percentile_99_5": 300.0,
        "mean": 50.0,
        "std": 25.0,
    }
    plan = make_plan(
        fingerprint_like((200, 200, 100), (1, 1, 1), modality="CT", intensity=stats), CPU
    )
    low, high, mean, std = plan.values["ct_foreground_stats"]
    assert (low, high, mean, std) == (-100.0, 300.0, 50.0, 25.0)
    out = normalize_intensity(
        np.array([-1000.0, 50.0, 1000.0]), "CT", ct_foreground_stats=(low, high, mean, std)
    )
    np.testing.assert_allclose(out, [(-100 - 50) / 25, 0.0, (300 - 50) / 25])
    mr = make_plan(fingerprint_like((200, 200, 100), (1, 1, 1), intensity=stats), CPU)
    assert "ct_foreground_stats" not in mr.values


def test_overrides_win_and_are_listed(hippocampus_dir):
    dataset = hippocampus_subset(hippocampus_dir)
    events = EventSink(quiet=True)
    base = {"method": "supervised", "device": "cpu", "modality": "MR"}
    config, plan = plan_training(dataset, base, {"batch_size": 2, "iterations": 5}, events)
    assert config.batch_size == 2 and config.iterations == 5
    assert plan.overrides == {"batch_size": 2, "iterations": 5}
    assert tuple(config.patch_size) == (32, 48, 32)
    assert config.network_options == plan.values["network_options"]
    event = next(e for e in events.history if e["event"] == "plan")
    assert "set by you" in event["message"] and event["plan"]["values"]["batch_size"] == 4


def test_train_writes_the_plan_and_predict_uses_it(hippocampus_dir, tmp_path):
    from SemiSupSegLib.backend.cli import main

    labeled = tmp_path / "labeled.txt"
    dataset = load_dataset(hippocampus_dir)
    names = [c.name for c in dataset.labeled]
    labeled.write_text("\n".join(names[:3]))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("\n".join(names[6:]))
    events = tmp_path / "events.jsonl"
    args = ["train", "--data", str(hippocampus_dir), "--labeled", str(labeled), "--exclude"]
    args += [str(exclude), "--method", "supervised", "--iterations", "2", "--device", "cpu"]
    args += ["--out", str(tmp_path / "run"), "--events", str(events), "--quiet"]
    args += ["--spacing", "1.5,1.5,1.5"]
    assert main(args) == 0
    plan = json.loads((tmp_path / "run" / PLAN_FILE).read_text())
    assert plan["overrides"] == {"target_spacing": [1.5, 1.5, 1.5], "iterations": 2}
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.index("plan") < kinds.index("start")
    state = torch.load(tmp_path / "run" / MODEL_FILE, map_location="cpu", weights_only=False)
    assert list(state["preprocessing"]["target_spacing"]) == [1.5, 1.5, 1.5]
    assert (
        state["model"]["spec"]["options"]["strides"] == plan["values"]["network_options"]["strides"]
    )
    image = hippocampus_dir / "imagesTr" / f"{names[5]}.nii.gz"
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(image), "--out", str(tmp_path / "pred"), "--quiet"]) == 0  # fmt: skip
    import SimpleITK as sitk

    assert (
        sitk.ReadImage(str(tmp_path / "pred" / image.name)).GetSize()
        == sitk.ReadImage(str(image)).GetSize()
    )
    assert main(args[:-2] + ["--plan", "off", "--out", str(tmp_path / "preset")]) == 0
    assert not (tmp_path / "preset" / PLAN_FILE).exists()
