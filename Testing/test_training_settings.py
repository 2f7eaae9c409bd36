"""Numbers that used to be written into the code are settings: gradient clipping, the
augmentation ranges and the sliding window, each read where it is used and checked."""

from __future__ import annotations

import pytest
import torch

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.inference import Predictor
from SemiSupSegLib.backend.methods import create_method
from SemiSupSegLib.backend.networks import network_from_spec
from SemiSupSegLib.backend.preprocessing import labeled_transforms, unlabeled_transforms
from SemiSupSegLib.backend.training import _preprocessing

TINY = {
    "method": "supervised",
    "patch_size": [16, 16, 16],
    "feature_channels": 8,
    "batch_size": 1,
    "network_options": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
}


def test_defaults_are_the_values_that_were_written_into_the_code():
    config = TrainConfig()
    assert config.gradient_clip == 12.0
    assert (config.augment_rotation, config.augment_scaling) == (0.26, 0.15)
    assert (config.augment_noise_std, config.augment_gamma) == (0.1, (0.7, 1.5))
    assert (config.augment_intensity_scale, config.augment_intensity_shift) == (0.15, 0.1)
    assert (config.sliding_window_overlap, config.sliding_window_batch) == (0.5, 4)


def test_gradients_are_clipped_to_the_setting(monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    config = TrainConfig.from_dict({**TINY, "gradient_clip": 0.5})
    method = create_method(config, 3, torch.device("cpu"))
    batch = {
        "image": torch.randn(1, 1, 16, 16, 16),
        "label": torch.randint(0, 3, (1, 1, 16, 16, 16)),
    }
    method.train_step(batch, None, 0)
    assert norms == [0.5]


@pytest.mark.parametrize("transforms", [labeled_transforms, unlabeled_transforms])
def test_augmentations_draw_within_the_configured_ranges(transforms):
    config = TrainConfig.from_dict(
        {
            "augment_rotation": 0.5,
            "augment_scaling": 0.05,
            "augment_noise_std": 0.3,
            "augment_intensity_scale": 0.25,
            "augment_intensity_shift": 0.2,
            "augment_gamma": [0.8, 1.2],
        }
    )
    steps = {type(t).__name__: t for t in transforms(config).transforms}
    grid = steps["RandAffined"].rand_affine.rand_affine_grid
    assert grid.rotate_range == (0.5, 0.5, 0.5) and grid.scale_range == (0.05, 0.05, 0.05)
    assert steps["RandGaussianNoised"].rand_gaussian_noise.std == 0.3
    assert steps["RandScaleIntensityd"].scaler.factors == (-0.25, 0.25)
    assert steps["RandShiftIntensityd"].shifter.offsets == (-0.2, 0.2)
    assert steps["RandAdjustContrastd"].adjuster.gamma == (0.8, 1.2)


@pytest.mark.parametrize(
    "setting, value",
    [
        ("gradient_clip", 0),
        ("augment_rotation", -0.1),
        ("augment_gamma", [1.5, 0.7]),
        ("sliding_window_overlap", 1.0),
        ("sliding_window_batch", 0),
    ],
)
def test_values_that_cannot_work_are_refused_by_name(setting, value):
    with pytest.raises(ConfigError, match=setting):
        TrainConfig.from_dict({setting: value}).validate()


def test_prediction_uses_the_sliding_window_the_model_was_trained_with():
    config = TrainConfig.from_dict({**TINY, "sliding_window_overlap": 0.25})
    config = config.with_setting("sliding_window_batch", 2)
    network = create_method(config, 3, torch.device("cpu")).deploy_network()
    rebuilt = network_from_spec(network.spec)
    predictor = Predictor(rebuilt, {1: "a"}, _preprocessing(config), torch.device("cpu"))
    assert (predictor.overlap, predictor.sw_batch_size) == (0.25, 2)
    older = {k: v for k, v in _preprocessing(config).items() if "sliding" not in k}
    predictor = Predictor(rebuilt, {1: "a"}, older, torch.device("cpu"), sw_batch_size=8)
    assert (predictor.overlap, predictor.sw_batch_size) == (0.5, 8)
