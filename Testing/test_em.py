"""Embedding matching and the teacher-student baselines: known-answer tests of the pieces, and a
few training iterations of each method on real hippocampus cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Case, Dataset, load_dataset
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.methods import create_method
from SemiSupSegLib.backend.methods.embedding_matching import (
    class_prototypes,
    limit_share,
    match_similarities,
    matching_entropy,
    matching_mean,
    reference_voxels,
)
from SemiSupSegLib.backend.methods.teacher_student import ema_decay, ramp, reliability_threshold
from SemiSupSegLib.backend.training import train
from SemiSupSegLib.output_layout import MODEL_FILE

TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2]}


def test_ramp_threshold_and_ema_schedules_give_published_values():
    assert ramp(0, 1000, 0.25) == pytest.approx(0.25 * math.exp(-5))
    assert ramp(500, 1000, 0.25) == pytest.approx(0.25 * math.exp(-1.25))
    assert ramp(1000, 1000, 0.25) == pytest.approx(0.25)
    assert ramp(5000, 1000, 0.125) == pytest.approx(0.125)
    assert reliability_threshold(0, 1000, 2) == pytest.approx(
        (0.75 + 0.25 * math.exp(-5)) * math.log(2)
    )
    assert reliability_threshold(1000, 1000, 2) == pytest.approx(math.log(2))
    assert reliability_threshold(1000, 1000, 3) == pytest.approx(math.log(3))
    assert ema_decay(1, 0.99) == pytest.approx(0.5)
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(10_000, 0.99) == pytest.approx(0.99)


def test_em_final_weights_and_dropout_option():
    config = TrainConfig.from_dict({"method": "em", "iterations": 100})
    method = create_method(config, 3, torch.device("cpu"))
    assert method.weights(100) == {"consistency": 0.25, "matching": 0.125}
    assert method.deploy_network().spec["dropout"] == 0.15
    assert method.batch_composition(0) == (4, 2)  # batch_size 4 labeled, half as many unlabeled
    published = config.with_setting("method.unlabeled_batch", 0)
    assert create_method(published, 3, torch.device("cpu")).batch_composition(0) == (2, 2)
    added = config.with_setting("method.unlabeled_batch", 3)
    assert create_method(added, 3, torch.device("cpu")).batch_composition(0) == (4, 3)
    override = config.with_setting("method.dropout", 0.0)
    assert create_method(override, 3, torch.device("cpu")).deploy_network().spec["dropout"] == 0
    mt = TrainConfig.from_dict({"method": "mean-teacher", "dropout": 0.05})
    assert create_method(mt, 3, torch.device("cpu")).deploy_network().spec["dropout"] == 0.05
    with pytest.raises(ConfigError, match="unknown setting 'method.nonsense' of method 'em'"):
        create_method(config.with_setting("method.nonsense", 1), 3, torch.device("cpu"))


def _two_objects() -> np.ndarray:
    """A (1, 20, 24, 24) label patch: a ball of class 1 and a box of class 2 beside it."""
    z, y, x = np.mgrid[:20, :24, :24]
    label = np.zeros((20, 24, 24), dtype=np.int64)
    label[(z - 10) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 <= 36] = 1
    label[4:16, 14:22, 12:20] = 2
    return label[None]


def test_reference_voxels_fall_in_the_band_of_their_class():
    labels = _two_objects()
    refs = reference_voxels(labels, 3, k=16, repeats=5, band=(1, 3), rng=np.random.default_rng(0))
    assert sorted(refs) == [0, 1, 2]
    for c, idx in refs.items():
        assert len(idx) == 16 * 5
        inside = labels[0] == c
        depth = ndimage.distance_transform_edt(inside)  # distance to the class's surface
        for _, z, y, x in idx:
            assert inside[z, y, x]
            assert 1 <= depth[z, y, x] <= 3
    # Background's references lie just outside the objects: 1-3 voxels from foreground.
    outside = ndimage.distance_transform_edt(labels[0] == 0)
    assert all(1 <= outside[z, y, x] <= 3 for _, z, y, x in refs[0])
    # A class absent from the patch has no references.
    assert 2 not in reference_voxels(np.where(labels == 2, 0, labels), 3, 4, 1)


def _embedding(labels: np.ndarray, seed: int) -> torch.Tensor:
    """Embeddings (B, 4, ...) where class c points along axis c, plus noise."""
    rng = np.random.default_rng(seed)
    directions = np.eye(4, dtype=np.float32)[:3]
    emb = directions[labels].transpose(0, 4, 1, 2, 3) * 1.0
    emb = emb + rng.normal(scale=0.15, size=emb.shape).astype(np.float32)
    return torch.as_tensor(emb)


def test_matching_labels_a_constructed_embedding():
    labels = _two_objects()
    refs = reference_voxels(labels, 3, 16, 5, (1, 3), np.random.default_rng(0))
    prototypes, present = class_prototypes(_embedding(labels, 0), refs, 3)
    assert bool(present.all())
    unseen = np.roll(labels, 3, axis=3)  # a different "unlabeled" patch
    similarity = match_similarities(_embedding(unseen, 1), prototypes, present)
    assert similarity.shape == (1, 3, 20, 24, 24)
    matched = similarity.argmax(1).numpy()
    assert (matched == unseen).mean() > 0.99
    # A class without references is never chosen.
    present[2] = False
    assert not (match_similarities(_embedding(unseen, 1), prototypes, present).argmax(1) == 2).any()


def test_matching_loss_weighs_as_its_share_of_voxels():
    values = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mask = torch.tensor([[False, False, False, True]])
    assert float(matching_mean(values, mask, "unreliable")) == pytest.approx(6.0)
    assert float(matching_mean(values, mask, "all")) == pytest.approx(1.5)  # 6 x 1/4
    assert float(matching_mean(values, torch.zeros_like(mask), "all")) == 0.0
    with pytest.raises(ConfigError, match="matching_reduction"):
        create_method(
            TrainConfig(method="em", method_options={"matching_reduction": "x"}),
            3,
            torch.device("cpu"),
        )


def test_limit_share_keeps_the_most_uncertain_voxels():
    score = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.3, 0.4, 0.5, 0.95])
    unsure = score > 0.45
    limited = limit_share(unsure, score, 0.3)
    assert limited.tolist() == (score >= 0.8).tolist()
    assert torch.equal(limit_share(unsure, score, None), unsure)
    assert torch.equal(limit_share(unsure, score, 0.9), unsure)  # already under the limit
    assert not bool(limit_share(unsure, score, 0.0).any())


def test_entropy_regulariser_pushes_separable_embeddings_apart():
    torch.manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), dim=1)
    present = torch.ones(2, dtype=torch.bool)
    truth = torch.arange(64) % 2
    start = prototypes[truth] * 0.2 + prototypes[1 - truth] * 0.15 + 0.02 * torch.randn(64, 2)
    embedding = torch.nn.Parameter(start.T.reshape(1, 2, 4, 4, 4).clone())
    optimizer = torch.optim.Adam([embedding], lr=0.05)

    def margin_and_loss():
        similarity = match_similarities(embedding, prototypes, present).reshape(2, -1)
        own = similarity.gather(0, truth[None]).squeeze(0)
        other = similarity.gather(0, (1 - truth)[None]).squeeze(0)
        return float((own - other).mean().detach()), matching_entropy(similarity[None], 1.0).mean()

    margin0, loss0 = margin_and_loss()
    loss0 = float(loss0.detach())
    assert margin0 > 0  # separable: each voxel is nearer its own class
    for _ in range(20):
        _, loss = margin_and_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    margin1, loss1 = margin_and_loss()
    loss1 = float(loss1.detach())
    assert loss1 < loss0 - 0.01
    assert margin1 > margin0 + 0.05


@pytest.fixture(scope="module")
def few_cases(hippocampus_dir):
    full = load_dataset(hippocampus_dir)
    return Dataset(
        full.labeled[:3], [Case(c.name, c.image) for c in full.labeled[3:6]], full.classes, "MR"
    )


@pytest.mark.parametrize("method", ["em", "ua-mt", "mean-teacher"])
def test_method_trains_a_few_iterations_on_hippocampus(method, few_cases, tmp_path):
    config = TrainConfig.from_dict(
        {
            "method": method,
            "iterations": 2,
            "batch_size": 2,
            "log_every": 1,
            "patch_size": [32, 32, 32],
            "network_options": TINY_UNET,
        }
    )
    events_path = tmp_path / "events.jsonl"
    sink = EventSink(str(events_path), quiet=True)
    result = train(few_cases, config, tmp_path / "run", sink)
    sink.close()
    assert all(math.isfinite(v) for v in result.final_losses.values())
    progress = [json.loads(line) for line in events_path.read_text().splitlines()]
    progress = [e for e in progress if e["event"] == "progress"]
    assert len(progress) == 2
    share = progress[-1]["metrics"]["reliable_share"]
    assert 0.0 <= share <= 1.0
    if method == "em":
        assert {"supervised", "consistency", "matching"} <= set(result.final_losses)
    model = load_checkpoint(tmp_path / "run" / MODEL_FILE)
    expected = 0.0 if method == "mean-teacher" else 0.15
    assert model["model"]["spec"]["dropout"] == expected


def test_mn_em_cotrains_a_few_iterations_on_hippocampus(few_cases, tmp_path):
    config = TrainConfig.from_dict(
        {
            "method": "mn+em",
            "iterations": 3,
            "batch_size": 2,
            "log_every": 1,
            "patch_size": [16, 32, 32],
            "feature_channels": 8,
            "network_options": TINY_UNET,
            "method_options": {
                "warmup_stage_fraction": 0.34,  # warm-up, then co-training with unlabeled
                "train_slices": 2,
                "encoder_weights": "none",
            },
        }
    )
    events_path = tmp_path / "events.jsonl"
    sink = EventSink(str(events_path), quiet=True)
    result = train(few_cases, config, tmp_path / "run", sink)
    sink.close()
    assert all(math.isfinite(v) for v in result.final_losses.values())
    progress = [json.loads(line) for line in events_path.read_text().splitlines()]
    metrics = [e["metrics"] for e in progress if e["event"] == "progress"]
    assert 0.0 <= metrics[-1]["unreliable_share"] <= 1.0  # co-training steps report it
    model = load_checkpoint(tmp_path / "run" / MODEL_FILE)
    assert model["model"]["spec"]["dropout"] == 0.15
