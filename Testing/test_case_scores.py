"""The case scores beside the shipped one: their values on cases with a known answer, which of
them a model can give, the one ``score`` copies, and their way from ``predict`` through
``scores.csv`` to the review table, with M&N's 2D model read from a real run folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SemiSupSegLib.backend import case_scores
from SemiSupSegLib.backend.case_scores import (
    CaseScores,
    disagreement,
    expected_changed_share,
    foreground_region,
    working_grid_scores,
)
from SemiSupSegLib.backend.checkpoint import load_checkpoint, save_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Case, Dataset, load_dataset
from SemiSupSegLib.backend.inference import Predictor, predict_cases
from SemiSupSegLib.backend.networks import create_network
from SemiSupSegLib.backend.networks2d import SliceWise
from SemiSupSegLib.backend.training import train
from SemiSupSegLib.output_layout import CASE_SCORES, CHECKPOINT_FILE, SCORES_FILE
from SemiSupSegLib.results import readScores

SMALL_UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def one_hot(label: np.ndarray, classes: int = 2, sure: float = 1.0) -> np.ndarray:
    """Class probabilities putting ``sure`` on ``label``'s class, the rest spread evenly."""
    probabilities = np.full((classes,) + label.shape, (1.0 - sure) / (classes - 1))
    np.put_along_axis(probabilities, label[None].astype(np.int64), sure, 0)
    return probabilities


def cube(shape=(20, 20, 20), low=5, high=10) -> np.ndarray:
    label = np.zeros(shape, np.int64)
    label[low:high, low:high, low:high] = 1
    return label


def test_region_is_the_union_of_the_foregrounds_grown_and_clipped():
    a, b = np.zeros((10, 12, 14), int), np.zeros((10, 12, 14), int)
    a[2:4, 3:5, 6:8] = 1
    b[7, 9, 0] = 2
    assert foreground_region([a], margin=1) == (slice(1, 5), slice(2, 6), slice(5, 9))
    assert foreground_region([a, b], margin=2) == (slice(0, 10), slice(1, 12), slice(0, 10))
    empty = np.zeros((3, 4, 5), int)
    assert foreground_region([empty]) == (slice(0, 3), slice(0, 4), slice(0, 5))


def test_disagreement_is_zero_for_agreement_one_for_contradiction_and_ignores_the_field_of_view():
    label = cube()
    assert disagreement(one_hot(label), one_hot(label), foreground_region([label])) == 0.0
    everywhere = (slice(None),) * 3
    assert disagreement(one_hot(label), one_hot(1 - label), everywhere) == 1.0
    shifted = np.roll(label, 2, axis=0)  # the other model's structure two voxels lower
    small = disagreement(one_hot(label), one_hot(shifted), foreground_region([label, shifted]))
    big_label, big_shifted = cube((60, 60, 60)), np.roll(cube((60, 60, 60)), 2, axis=0)
    big = disagreement(
        one_hot(big_label), one_hot(big_shifted), foreground_region([big_label, big_shifted])
    )
    assert 0 < small == pytest.approx(big)  # more background around it changes nothing
    hesitant = one_hot(label)
    differ = label != shifted
    hesitant[:, differ] = one_hot(shifted, sure=0.6)[:, differ]
    soft = disagreement(one_hot(label), hesitant, foreground_region([label, shifted]))
    assert soft == pytest.approx(0.6 * small)  # a hesitant contradiction counts less


def test_expected_changed_share_is_the_expected_error_per_structure_voxel():
    label = cube()  # 125 foreground voxels of 8000
    assert expected_changed_share(one_hot(label), label) == 0.0
    assert expected_changed_share(one_hot(label, sure=0.9), label) == pytest.approx(
        0.1 * 8000 / 125
    )
    probabilities = one_hot(label)
    probabilities[:, 0, 0, 0] = (0.6, 0.4)  # one background voxel only 60% background
    assert expected_changed_share(probabilities, label) == pytest.approx(0.4 / 125)


def test_working_grid_scores_say_which_a_model_cannot_give():
    label = cube()
    probabilities = one_hot(label, sure=0.9)
    alone = working_grid_scores(probabilities)
    assert alone["disagreement"] is None and alone["mutual_information"] is None
    information = np.zeros(label.shape)
    information[5:10, 5:10, 5:10] = 0.2
    both = working_grid_scores(probabilities, information, one_hot(label))
    assert both["disagreement"] == pytest.approx(0.1)
    # the mean over the structure's box grown by two voxels: 125 of 9 ** 3 voxels at 0.2
    assert both["mutual_information"] == pytest.approx(0.2 * 125 / 9**3)


def test_the_review_score_is_the_named_choice_with_the_shipped_one_as_fallback(monkeypatch):
    scores = CaseScores(boundary_uncertainty=0.3, disagreement=0.7)
    assert case_scores.REVIEW_SCORE == "boundary_uncertainty" and scores.review == 0.3
    monkeypatch.setattr(case_scores, "REVIEW_SCORE", "disagreement")
    assert scores.review == 0.7
    assert CaseScores(boundary_uncertainty=0.3).review == 0.3  # no second model


def test_bald_needs_dropout_and_several_passes(hippocampus_dir):
    case = load_dataset(hippocampus_dir).labeled[0]
    from SemiSupSegLib.backend.volumes import read_image

    image = read_image(case.image)
    torch.manual_seed(0)
    for dropout in (0.0, 0.3):
        network = create_network("unet", 3, feature_channels=8, dropout=dropout, **SMALL_UNET)
        predictor = Predictor(network, {0: "bg", 1: "a", 2: "b"}, {"patch_size": (16, 16, 16), "modality": "MR"}, torch.device("cpu"))  # fmt: skip
        assert predictor.predict(case.name, image, 1).scores.mutual_information is None
        information = predictor.predict(case.name, image, 3).scores.mutual_information
        if dropout:
            assert information > 0
        else:
            assert information is None  # all passes alike: not a score


@pytest.fixture(scope="module")
def mn_run(hippocampus_dir, tmp_path_factory):
    """A run folder of M&N trained for two iterations on hippocampus cases, and two cases."""
    full = load_dataset(hippocampus_dir)
    dataset = Dataset(full.labeled[:2], full.labeled[2:4], full.classes, "MR")
    config = TrainConfig.from_dict(
        {
            "method": "mn",
            "iterations": 2,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "feature_channels": 8,
            "network_options": SMALL_UNET,
            "checkpoint_every": 0,
            "method_options": {"warmup_stage_fraction": 0.5, "train_slices": 4},
        }
    )
    run = tmp_path_factory.mktemp("mn") / "run"
    train(dataset, config, run)
    return run, [Case(c.name, c.image) for c in full.labeled[4:6]]


def test_predict_writes_the_disagreement_with_mns_2d_model_and_the_review_table_reads_it(
    mn_run, tmp_path
):
    run, cases = mn_run
    predictor = Predictor.from_run(run, device="cpu")
    assert isinstance(predictor.companion, SliceWise)
    trained_2d = load_checkpoint(run / CHECKPOINT_FILE)["method_state"]["net2d"]
    for name, value in predictor.companion.state_dict().items():
        assert torch.equal(value, trained_2d[name]), name
    rows = predict_cases(predictor, cases, tmp_path / "pred")
    assert all(0 < r.disagreement <= 1 for r in rows)
    assert all(r.score == r.boundary_uncertainty for r in rows)  # REVIEW_SCORE
    assert all(r.mutual_information is None for r in rows)  # one pass, no dropout
    header = (tmp_path / "pred" / SCORES_FILE).read_text().splitlines()[0].split(",")
    assert header[-len(CASE_SCORES) :] == list(CASE_SCORES)
    review = {r.case: r for r in readScores(tmp_path / "pred" / SCORES_FILE)}
    for written in rows:
        read = review[written.case].caseScores
        assert read == {k: v for k, v in written.case_scores().items()}
        assert set(read) == {"boundary_uncertainty", "disagreement", "expected_changed_share"}

    without = Predictor.from_run(run, device="cpu", companion=False)
    assert without.companion is None
    assert without.predict(cases[0].name, _image(cases[0])).scores.disagreement is None


def test_a_checkpoint_of_another_training_gives_no_2d_model(mn_run, tmp_path):
    run, cases = mn_run
    other = tmp_path / "run"
    other.mkdir()
    model = load_checkpoint(run / "model.pt")
    save_checkpoint(other / "model.pt", model)
    checkpoint = load_checkpoint(run / CHECKPOINT_FILE)
    save_checkpoint(other / CHECKPOINT_FILE, {**checkpoint, "run_id": "another run"})
    assert Predictor.from_run(other, device="cpu").companion is None
    save_checkpoint(other / CHECKPOINT_FILE, checkpoint)
    assert Predictor.from_run(other, device="cpu").companion is not None


def _image(case: Case):
    from SemiSupSegLib.backend.volumes import read_image

    return read_image(case.image)


def test_the_2d_model_is_rebuilt_without_its_starting_weights(mn_run, tmp_path):
    """predict takes the 2D model's weights from the checkpoint: where training got its
    starting weights (a download, a file) is not read again; here that file is gone."""
    run, _ = mn_run
    other = tmp_path / "run"
    other.mkdir()
    save_checkpoint(other / "model.pt", load_checkpoint(run / "model.pt"))
    checkpoint = load_checkpoint(run / CHECKPOINT_FILE)
    config = dict(checkpoint["config"])
    config["method_options"] = {
        **config["method_options"],
        "encoder_weights": str(tmp_path / "deleted-weights.pth"),
    }
    save_checkpoint(other / CHECKPOINT_FILE, {**checkpoint, "config": config})
    assert Predictor.from_run(other, device="cpu").companion is not None
