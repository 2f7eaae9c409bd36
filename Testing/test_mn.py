"""M&N co-training: the sampling schedule, who teaches whom, any encoder with any 3D network,
resume, and a short co-training run on real hippocampus cases that lowers both losses."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Dataset, load_dataset
from SemiSupSegLib.backend.errors import CancelledError, ConfigError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.methods import create_method
from SemiSupSegLib.backend.methods.embedding_matching import MNEMOptions
from SemiSupSegLib.backend.methods.mn import (
    Teaching,
    TwoCycleSchedule,
    labels_one_hot,
    lr_guided_unlabeled,
)
from SemiSupSegLib.backend.training import StopFlag, previous_method_state, train
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, MODEL_FILE

# Three levels, so 16-voxel test patches keep more than one voxel at the bottom.
SMALL_UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def _config(**options) -> TrainConfig:
    base = {
        "method": "mn",
        "iterations": 10,
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "feature_channels": 8,
        "network_options": SMALL_UNET,
        "method_options": {"warmup_stage_fraction": 0.3, "train_slices": 4},
    }
    network = options.pop("network", None)
    if network is not None:
        base["network"] = network
        base["network_options"] = SMALL_UNET if network == "unet" else {}
    base["method_options"].update(options)
    return TrainConfig.from_dict(base)


def _batch(n: int, labeled: bool, size=(16, 16, 16)):
    generator = torch.Generator().manual_seed(n + int(labeled))
    image = torch.randn(n, 1, *size, generator=generator)
    if not labeled:
        return {"image": image}
    label = torch.zeros(n, 1, *size, dtype=torch.int64)
    label[:, :, 4:12, 4:10, 5:11] = 1
    label[:, :, 4:12, 10:13, 5:11] = 2
    return {"image": image + label.float(), "label": label}


def test_sampling_schedule_values():
    # floor(B * arccos(2 lr/lr0 - 1) / pi), at least one labeled patch.
    assert lr_guided_unlabeled(5, 1.0, 1.0) == 0
    assert lr_guided_unlabeled(5, 0.5, 1.0) == 2  # floor(2.5)
    assert lr_guided_unlabeled(4, 0.5, 1.0) == 2
    assert lr_guided_unlabeled(4, (1 + math.cos(math.pi / 4)) / 2, 1.0) == 1  # progress 1/4
    assert lr_guided_unlabeled(4, 0.1, 1.0) == 3  # floor(4 * 0.795)
    assert lr_guided_unlabeled(4, 0.0, 1.0) == 3  # would be 4: one labeled stays
    assert lr_guided_unlabeled(4, 0.0, 1.0, min_labeled=0) == 4
    assert lr_guided_unlabeled(8, 3e-4, 1e-3) == 5  # floor(8 * arccos(-0.4) / pi) = floor(5.05)
    # Over a cosine cycle the count equals floor(B * progress).
    for step in range(101):
        progress = step / 100
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_guided_unlabeled(5, lr, 1e-3, 0) == math.floor(5 * progress + 1e-6)

    factor = TwoCycleSchedule(total=100, stage1=20, warmup=4)
    assert [factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert factor(20) == 1.0  # restart
    assert factor(60) == pytest.approx(0.5)
    assert factor(99) < 1e-3


def test_batch_composition_follows_the_stages():
    method = create_method(_config(unlabeled_mode="replace"), 3, torch.device("cpu"))
    compositions = [method.batch_composition(i) for i in range(10)]
    assert compositions[:3] == [(2, 0)] * 3  # warm-up: labeled only
    assert compositions[3] == (2, 0) and compositions[-1] == (1, 1)
    assert all(n_l >= 1 and n_l + n_u == 2 for n_l, n_u in compositions)
    assert [method.stage(i) for i in (0, 2, 3, 9)] == [
        "warm-up",
        "warm-up",
        "co-training",
        "co-training",
    ]
    with pytest.raises(ConfigError, match="unknown setting 'method.no_such_option' of method 'mn'"):
        create_method(_config(no_such_option=1), 3, torch.device("cpu"))

    added = create_method(_config(), 3, torch.device("cpu"))
    assert added.options.unlabeled_mode == "add"  # mn's default
    assert MNEMOptions().unlabeled_mode == "replace"  # mn+em keeps the paper's (not measured)
    compositions = [added.batch_composition(i) for i in range(10)]
    assert all(n_l == 2 for n_l, _ in compositions)  # labeled patches never give way
    unlabeled = [n_u for _, n_u in compositions]
    assert unlabeled == sorted(unlabeled) and unlabeled[3] == 0 and unlabeled[-1] == 1
    assert added.batch_composition(10**6)[1] == 2  # the whole batch size once the LR is 0
    with pytest.raises(ConfigError, match="unlabeled_mode"):
        create_method(_config(unlabeled_mode="mix"), 3, torch.device("cpu"))


@pytest.mark.parametrize("alternation", ["iteration", "phase"])
def test_who_teaches_whom(alternation):
    method = create_method(_config(alternation=alternation, phase_length=2), 3, torch.device("cpu"))
    assert method.roles(0) == [("3d", "labels"), ("2d", "labels")]
    if alternation == "iteration":
        assert method.roles(3) == [("2d", "3d"), ("3d", "2d")]
    else:
        assert [method.roles(i) for i in (3, 4, 5, 6)] == [
            [("2d", "3d")],
            [("2d", "3d")],
            [("3d", "2d")],
            [("3d", "2d")],
        ]

    # Spy on every forward: the teacher runs in eval mode without gradients, the student in
    # train mode with them; only the student's weights move.
    calls = []
    for name, network in (("3d", method.net3d), ("2d", method.net2d)):
        network.register_forward_hook(
            lambda module, _inp, _out, name=name: calls.append(
                (name, module.training, torch.is_grad_enabled())
            )
        )
    iteration = 5 if alternation == "phase" else 3  # phase: the 3D model learns
    before = {
        "3d": [p.detach().clone() for p in method.net3d.parameters()],
        "2d": [p.detach().clone() for p in method.net2d.parameters()],
    }
    result = method.train_step(_batch(1, True), _batch(1, False), iteration)
    expected = {
        "iteration": [("3d", False, False), ("2d", True, True), ("2d", False, False), ("3d", True, True)],
        "phase": [("2d", False, False), ("3d", True, True)],
    }[alternation]  # fmt: skip
    assert calls == expected
    learners = {student for student, _ in method.roles(iteration)}
    for name in ("3d", "2d"):
        network = method.net3d if name == "3d" else method.net2d
        moved = any(not torch.equal(a, b) for a, b in zip(before[name], network.parameters()))
        assert moved == (name in learners), name
    assert result.info["n_labeled"] == 1 and result.info["n_unlabeled"] == 1
    assert "3D learns from 2D" in result.info["message"]


@pytest.mark.parametrize(
    "encoder,weights,network",
    [("mobilenetv2_100", "offline", "unet"), ("resnet18", "none", "segresnet")],
)
def test_encoders_and_3d_networks_train(encoder, weights, network):
    config = _config(encoder=encoder, encoder_weights=weights, network=network)
    method = create_method(config, 3, torch.device("cpu"))
    assert method.deploy_network() is method.net3d
    assert method.deploy_network().spec["name"] == network
    for iteration in (0, 3, 9):
        n_labeled, n_unlabeled = method.batch_composition(iteration)
        unlabeled = _batch(n_unlabeled, False) if n_unlabeled else None
        result = method.train_step(_batch(n_labeled, True), unlabeled, iteration)
        assert set(result.losses) == {"loss_3d", "loss_2d"}
        assert all(math.isfinite(v) for v in result.losses.values())


class _StopAfter(StopFlag):
    """Requests a stop once the loop has asked ``count`` times (i.e. after count-1 iterations)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    @property
    def requested(self) -> bool:
        self.count -= 1
        return self.count < 0


@pytest.fixture(scope="module")
def hippocampus(hippocampus_dir):
    full = load_dataset(hippocampus_dir)
    return full


def test_cancel_and_resume(hippocampus, tmp_path):
    dataset = Dataset(hippocampus.labeled[:2], hippocampus.labeled[2:4], hippocampus.classes, "MR")
    config = _config().with_setting("iterations", 6)
    with pytest.raises(CancelledError):
        train(dataset, config, tmp_path, stop=_StopAfter(4))
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state["iteration"] == 4
    assert state["method_state"]["sched2d"]["last_epoch"] == 4
    result = train(dataset, config, tmp_path, resume=True)
    assert result.iterations == 6
    final = load_checkpoint(tmp_path / CHECKPOINT_FILE)["method_state"]
    assert final["sched3d"]["last_epoch"] == 6 and final["opt2d"]["state"]


def test_short_cotraining_on_hippocampus_lowers_both_losses(hippocampus, tmp_path):
    labeled, unlabeled = hippocampus.labeled[:4], hippocampus.labeled[4:12]
    dataset = Dataset(labeled, unlabeled, hippocampus.classes, "MR")
    config = TrainConfig.from_dict(
        {
            "method": "mn",
            "iterations": 30,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "feature_channels": 8,
            "network_options": SMALL_UNET,
            "log_every": 1,
            "method_options": {"warmup_stage_fraction": 0.5, "lr_2d": 3e-3},
        }
    )
    events_path = tmp_path / "events.jsonl"
    sink = EventSink(str(events_path), quiet=True)
    train(dataset, config, tmp_path / "run", sink)
    sink.close()
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["warm-up", "co-training"]
    progress = [e for e in events if e["event"] == "progress"]
    assert any(e["metrics"]["n_unlabeled"] > 0 for e in progress)
    assert "2D learns from 3D" in progress[-1]["message"]
    for key in ("loss_3d", "loss_2d"):
        losses = [e["loss"][key] for e in progress]
        early, late = np.mean(losses[:5]), np.mean(losses[-5:])
        assert late < 0.95 * early, (key, early, late)


def test_warm_start_resumes_the_2d_partner(hippocampus, tmp_path):
    """A retraining round starts both networks from the previous round: the 3D model from
    the model file, the trained 2D model from the checkpoint beside it. From a model of
    another method (no 2D partner) the 2D model starts fresh, and the log says so."""
    dataset = Dataset(hippocampus.labeled[:2], hippocampus.labeled[2:4], hippocampus.classes, "MR")
    config = _config().with_setting("iterations", 2)
    train(dataset, config, tmp_path / "round1")
    previous = load_checkpoint(tmp_path / "round1" / MODEL_FILE)
    assert "method_state" not in previous  # the model file holds the 3D model only

    state = previous_method_state(previous, tmp_path / "round1" / MODEL_FILE, config)
    method = create_method(config, 3, torch.device("cpu"))
    assert method.warm_start(previous["model"]["state_dict"], state) == []
    trained_2d = load_checkpoint(tmp_path / "round1" / CHECKPOINT_FILE)["method_state"]["net2d"]
    for name, value in method.net2d.state_dict().items():
        assert torch.equal(value, trained_2d[name]), name

    supervised = config.with_setting("method", "supervised").with_setting("method_options", {})
    train(Dataset(dataset.labeled, [], dataset.classes, "MR"), supervised, tmp_path / "sup")
    events_path = tmp_path / "events.jsonl"
    sink = EventSink(str(events_path), quiet=True)
    train(dataset, config, tmp_path / "round2", sink, init_from=tmp_path / "sup")
    sink.close()
    logs = [json.loads(line).get("message", "") for line in events_path.read_text().splitlines()]
    assert any(m.startswith("net2d: not in a mn checkpoint") for m in logs), logs


def test_each_schedule_advances_with_its_own_optimizer():
    method = create_method(_config(alternation="phase", phase_length=2), 3, torch.device("cpu"))
    # 10 iterations: 3 of warm-up (both learn), then 2D, 2D, 3D, 3D, 2D, 2D, 3D.
    assert method.sched2d.lr_lambdas[0].total == 3 + 4
    assert method.sched3d.lr_lambdas[0].total == 3 + 3
    lr_2d = method.opt2d.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        result = method.train_step(_batch(1, True), _batch(1, False), 5)  # the 3D model learns
    assert result.info["lr_2d"] == lr_2d and method.sched2d.last_epoch == 0
    assert method.sched3d.last_epoch == 1


def test_labels_one_hot_encodes_each_class_in_its_channel():
    label = torch.tensor([0, 2, 1, 2]).reshape(1, 1, 1, 2, 2)
    encoded = labels_one_hot(label, 3)
    assert encoded.shape == (1, 3, 1, 2, 2) and encoded.dtype == torch.float32
    assert torch.equal(encoded.argmax(1, keepdim=True), label)
    assert torch.equal(encoded.sum(1), torch.ones(1, 1, 2, 2))
    assert encoded.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_refiner_makes_the_pseudo_masks_and_adds_its_regulariser():
    method = create_method(_config(), 3, torch.device("cpu"))
    calls, regularised = [], []

    class Uniform:
        def teach(self, method, teacher, images, labeled, iteration):
            calls.append((teacher, images.shape[0], labeled["image"].shape[0], iteration))
            target = torch.full((images.shape[0], 3, *images.shape[2:]), 1 / 3)

            def regulariser(features):
                regularised.append(features.shape[0])
                return features.pow(2).mean(), 0.5

            return Teaching(target, regulariser, {"matched_share": 0.25})

    method.refiner = Uniform()
    result = method.train_step(_batch(1, True), _batch(1, False), 3)  # co-training
    assert calls == [("3d", 1, 1, 3), ("2d", 1, 1, 3)]  # 2D learns from 3D, then 3D from 2D
    assert regularised == [2]  # the 3D student's whole batch; the 2D student has none
    assert result.info["matched_share"] == 0.25 and "entropy_3d" in result.losses
