"""Networks by name, settings, preprocessing and checkpoints: small, fast, known answers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SemiSupSegLib.backend.checkpoint import load_checkpoint, save_checkpoint
from SemiSupSegLib.backend.config import TrainConfig, parse_setting
from SemiSupSegLib.backend.errors import ConfigError, DataError
from SemiSupSegLib.backend.networks import create_network, list_networks, network_from_spec
from SemiSupSegLib.backend.preprocessing import (
    normalize_intensity,
    prepare_volume,
    resample_like,
    resample_to_spacing,
)
from SemiSupSegLib.backend.splits import benchmark_split
from SemiSupSegLib.output_layout import CHECKPOINT_FILE


@pytest.mark.parametrize(
    "name, shape",
    [("unet", (32, 48, 32)), ("segresnet", (16, 24, 16)), ("swinunetr", (32, 64, 32))],
)
def test_networks_by_name_give_logits_and_embeddings(name, shape):
    torch.manual_seed(0)
    small = {"feature_size": 12} if name == "swinunetr" else {}
    network = create_network(name, num_classes=3, feature_channels=8, **small)
    x = torch.randn(1, 1, *shape)
    logits, features = network.forward_with_features(x)
    assert logits.shape == (1, 3, *shape)
    assert features.shape == (1, 8, *shape)
    rebuilt = network_from_spec(network.spec)
    rebuilt.load_state_dict(network.state_dict())
    network.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), network(x))


def test_unknown_network_lists_the_choices():
    with pytest.raises(ConfigError, match="available: segresnet, swinunetr, unet"):
        create_network("vnet9000", num_classes=2)
    assert {"unet", "segresnet", "swinunetr"} <= set(list_networks())


def test_settings_are_typed_and_unknown_names_rejected():
    config = TrainConfig.from_dict(
        {"iterations": "20", "patch_size": "32x48x32", "augment": "false", "method.ema_decay": 0.9}
    )
    assert config.iterations == 20 and config.patch_size == (32, 48, 32)
    assert config.augment is False and config.method_options == {"ema_decay": 0.9}
    assert parse_setting("patch_size=[16,16,16]") == ("patch_size", [16, 16, 16])
    with pytest.raises(ConfigError, match="unknown setting 'iteration'"):
        TrainConfig.from_dict({"iteration": 3})
    with pytest.raises(ConfigError, match="iterations"):
        TrainConfig(iterations=0).validate()
    with pytest.raises(ConfigError, match="not valid"):
        TrainConfig.from_dict({"batch_size": "many"})


def test_mr_zscore_and_ct_window():
    rng = np.random.default_rng(0)
    mr = rng.normal(300, 40, (8, 8, 8)).astype(np.float32)
    z = normalize_intensity(mr, "MR")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    ct = np.array([-2000, -1000, 0, 1000, 3000], dtype=np.float32)
    np.testing.assert_allclose(normalize_intensity(ct, "CT", (-1000, 1000)), [0, 0, 0.5, 1, 1])


def test_resampling_there_and_back_keeps_geometry():
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((10, 12, 14)).astype(np.float32))
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((5.0, -3.0, 2.0))
    image.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    working = resample_to_spacing(image, (1.0, 1.0, 1.0), is_label=False)
    assert working.GetSpacing() == (1.0, 1.0, 1.0)
    assert working.GetDirection() == image.GetDirection()
    assert working.GetSize() == (10, 11, 30)
    back = resample_like(working, image, is_label=False)
    assert back.GetSize() == image.GetSize() and back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    volume = prepare_volume("x", image, None, "MR", target_spacing=(1.0, 1.0, 1.0))
    assert volume.image.shape == (1, 30, 11, 10)


def test_checkpoints_are_atomic_and_damage_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_FILE, {"iteration": 3})
    loaded = load_checkpoint(tmp_path)
    assert loaded["iteration"] == 3 and "torch" in loaded["versions"]
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a SemiSupSeg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DataError, match="no model.pt or checkpoint.pt"):
        load_checkpoint(tmp_path / "empty_run")


def test_benchmark_split_is_fixed_and_nested():
    names = [f"case_{i:03d}" for i in range(200)]
    split = benchmark_split(list(reversed(names)))
    assert split == benchmark_split(names)
    assert len(split.train) == 160 and len(split.test) == 40
    assert not set(split.train) & set(split.test)
    assert split.labeled(4) == split.labeled(8)[:4] == split.labeled(16)[:4]


@pytest.mark.parametrize("method", ["supervised", "mean-teacher"])
def test_method_checkpoint_state_round_trips(method):
    """A method rebuilt from its ``state_dict`` has the same weights and optimiser state, so a
    resumed run continues the same training."""
    from SemiSupSegLib.backend.methods import create_method

    config = TrainConfig(method=method, batch_size=2, patch_size=(32, 32, 32), iterations=4)
    torch.manual_seed(0)
    first = create_method(config, num_classes=3, device=torch.device("cpu"))
    n_labeled, n_unlabeled = first.batch_composition(0)
    labeled = {
        "image": torch.randn(n_labeled, 1, 32, 32, 32),
        "label": torch.randint(0, 3, (n_labeled, 1, 32, 32, 32)),
    }
    unlabeled = {"image": torch.randn(n_unlabeled, 1, 32, 32, 32)} if n_unlabeled else None
    first.train_step(labeled, unlabeled, 0)
    torch.manual_seed(1)
    second = create_method(config, num_classes=3, device=torch.device("cpu"))
    second.load_state_dict(first.state_dict())
    for a, b in zip(first.deploy_network().parameters(), second.deploy_network().parameters()):
        torch.testing.assert_close(a, b)
    saved, restored = first.state_dict(), second.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        if "optim" in name or name.startswith("opt"):
            steps = [s["step"] for s in restored[name]["state"].values()]
            assert steps and all(float(s) == 1 for s in steps)


def test_compile_option_keeps_checkpoint_names():
    """``compile=true`` compiles the network in place (lazily, at its first call), so a
    checkpoint of a compiled run has the same parameter names and loads without it."""
    from SemiSupSegLib.backend.methods.base import create_method

    plain = create_method(TrainConfig(method="mean-teacher"), 3, torch.device("cpu"))
    compiled = create_method(
        TrainConfig(method="mean-teacher", compile=True), 3, torch.device("cpu")
    )
    network = compiled.deploy_network()
    assert network._compiled_call_impl is not None
    assert compiled.student._compiled_call_impl is not None
    assert list(network.state_dict()) == list(plain.deploy_network().state_dict())
    plain.deploy_network().load_state_dict(network.state_dict())
