"""Methods as plugins: the catalogue (standard library, what the panel, the protocol and the
command line read) agrees with the backend's registry; one default method; method options
read and checked by the rules of every other setting; and a method that is one file: a toy
method written to a file of its own is registered, trains through the command line on real
hippocampus cases, and is listed by the catalogue, with no other file touched."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from backend_helpers import run_cli, tiny_set_arguments
from SemiSupSegLib import method_catalogue
from SemiSupSegLib.backend import cli
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.methods import (
    base,
    describe_method,
    list_methods,
    method_class,
    method_options,
)
from SemiSupSegLib.method_catalogue import (
    BASELINE_METHOD,
    DEFAULT_METHOD,
    ENCODER_OPTION,
    NOT_PUBLISHED,
    OptionInfo,
)
from SemiSupSegLib.protocol import EXIT_FAILED, EXIT_OK, JobSpec, ProtocolError
from SemiSupSegLib.training_options import DEFAULT_ENCODER_2D, TrainingOptions

BUILT_IN_PACKAGE = "SemiSupSegLib.backend.methods."


def test_the_catalogue_lists_the_registry_exactly():
    """The built-in methods' names, capabilities and options (names, defaults, help, published
    values) in method_catalogue.py are those of the classes and options dataclasses."""
    registered = {
        n for n in list_methods() if method_class(n).__module__.startswith(BUILT_IN_PACKAGE)
    }
    listed = {m.name for m in method_catalogue.methods() if method_catalogue.is_built_in(m.name)}
    assert listed == registered
    for name in sorted(registered):
        entry = method_catalogue.method_info(name)
        code = describe_method(method_class(name))
        assert (code.uses_unlabeled, code.needs_2d_encoder) == (
            entry.uses_unlabeled,
            entry.needs_2d_encoder,
        ), name
        assert [o.name for o in code.options] == [o.name for o in entry.options], name
        for ours, theirs in zip(code.options, entry.options):
            assert ours == theirs, f"method_catalogue.py, {name}: {ours}"


def test_one_default_method_read_everywhere():
    parser = cli.build_parser()
    train = parser.parse_args(["train", "--out", "x"])
    compare = parser.parse_args(["compare", "--out", "x"])
    assert train.method == DEFAULT_METHOD
    assert compare.methods == [BASELINE_METHOD, DEFAULT_METHOD]
    assert TrainConfig().method == DEFAULT_METHOD
    assert JobSpec(labeled=[]).method == DEFAULT_METHOD
    assert TrainingOptions().method == DEFAULT_METHOD  # the panel
    assert method_class(DEFAULT_METHOD)  # registered
    assert not method_class(BASELINE_METHOD).uses_unlabeled
    # The panel proposes one encoder for every method with a 2D model.
    encoders = {
        m.option(ENCODER_OPTION).default for m in method_catalogue.methods() if m.needs_2d_encoder
    }
    assert encoders == {DEFAULT_ENCODER_2D}


def test_a_job_is_checked_against_the_catalogue():
    job = {
        "version": 1,
        "labeled": [{"name": "a", "image": "a.nrrd", "label": "a-label.nrrd"}],
        "unlabeled": [],
    }
    assert JobSpec.from_dict({**job, "method": BASELINE_METHOD}).method == BASELINE_METHOD
    for info in method_catalogue.methods():
        if info.uses_unlabeled:
            with pytest.raises(ProtocolError) as err:
                JobSpec.from_dict({**job, "method": info.name})
            assert f"method {info.name!r} learns from unlabeled" in str(err.value)
    with pytest.raises(ProtocolError, match="job.method"):
        JobSpec.from_dict({**job, "method": "magic"})


def test_method_options_are_typed_attributes():
    config = TrainConfig.from_dict(
        {
            "method": "mn+em",
            "method.slice_scale": "2",
            "method.encoder_out_indices": "0,1",
            "method.lr_3d": None,
            "method.band": [1, 2],
            "method.disagreement": "yes",
        }
    )
    options = method_options(config.validate())
    assert options.slice_scale == 2.0 and isinstance(options.slice_scale, float)
    assert options.encoder_out_indices == (0, 1)
    assert options.lr_3d is None and options.band == (1, 2) and options.disagreement is True
    assert options.train_slices == 8  # a default
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.train_slices = 2


def test_a_config_json_keeps_the_options_as_given_and_loads_them():
    """config.json (and a checkpoint's config) holds ``method_options`` as the dict the user
    set, JSON lists for tuples; it loads, and is written back the same."""
    written = {
        **TrainConfig().to_dict(),
        "method": "em",
        "method_options": {"band": [1, 4], "mc_passes": 3, "threshold_scale": None},
    }
    stored = json.loads(json.dumps(written))
    config = TrainConfig.from_dict(stored).validate()
    assert config.to_dict() == stored
    options = method_options(config)
    assert (options.band, options.mc_passes, options.threshold_scale) == ((1, 4), 3, None)
    assert options.references_k == 16


@pytest.mark.parametrize(
    "method, setting, value, message",
    [
        ("mn", "slice_axis", "w", "method.slice_axis must be one of z, y, x, got 'w'"),
        ("em", "ema_decay", 1.5, "method.ema_decay must be in [0, 1], got 1.5"),
        ("ua-mt", "mc_passes", "many", "setting 'method.mc_passes': 'many' is not valid"),
        ("mean-teacher", "mc_passes", 1.5, "setting 'method.mc_passes': 1.5 is not valid"),
        ("mn", "lr_3d", -1, "method.lr_3d must be a positive number, got -1"),
        ("mn+em", "max_unreliable_share", float("nan"), "method.max_unreliable_share must be a"),
        ("mn", "nonsense", 1, "unknown setting 'method.nonsense' of method 'mn'; known settings"),
        ("supervised", "ema_decay", 0.9, "method 'supervised' has no settings of its own"),
    ],
)
def test_bad_method_options_are_named_when_the_settings_are_checked(
    method, setting, value, message
):
    config = TrainConfig.from_dict({"method": method, f"method.{setting}": value})
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert message in str(err.value)


def test_a_method_option_and_a_training_setting_are_checked_alike():
    with pytest.raises(ConfigError) as setting:
        TrainConfig.from_dict({"method": BASELINE_METHOD, "dropout": 1.0}).validate()
    with pytest.raises(ConfigError) as option:
        TrainConfig.from_dict({"method": "ua-mt", "method.dropout": 1.0}).validate()
    assert str(setting.value) == "dropout must be in [0, 1), got 1.0"
    assert str(option.value) == "method.dropout must be in [0, 1), got 1.0"


TOY_METHOD = '''
"""A toy method, a plugin of its own: the supervised step plus entropy minimisation on the
unlabeled patches."""

from dataclasses import dataclass

import torch

from SemiSupSegLib.backend.methods import Method, option, register_method
from SemiSupSegLib.backend.methods.base import StepResult, segmentation_loss
from SemiSupSegLib.backend.settings import Range
from SemiSupSegLib.method_catalogue import NOT_PUBLISHED


@dataclass(frozen=True)
class ToyOptions:
    unlabeled_weight: float = option(
        0.5, "weight of the entropy of the unlabeled patches' prediction", NOT_PUBLISHED, Range(0)
    )


@register_method("toy", options=ToyOptions, uses_unlabeled=True)
class ToyMethod(Method):
    """Toy: one 3D network, Dice + cross-entropy on labeled patches, entropy on unlabeled ones."""

    def __init__(self, config, num_classes, device):
        super().__init__(config, num_classes, device)
        self.network = self.build_network()
        self.optimizer, self.schedule = self.build_optimizer(self.network)
        self.loss = segmentation_loss()

    def batch_composition(self, iteration):
        return self.config.batch_size, 1

    def train_step(self, labeled, unlabeled, iteration):
        self.network.train()
        n = labeled["image"].shape[0]
        logits = self.network(torch.cat([labeled["image"], unlabeled["image"]]).to(self.device))
        supervised = self.loss(logits[:n], labeled["label"].to(self.device))
        entropy = torch.special.entr(torch.softmax(logits[n:], 1)).sum(1).mean()
        loss = supervised + self.options.unlabeled_weight * entropy
        self.optimise(loss, self.optimizer, self.schedule)
        info = {"unlabeled_weight": self.options.unlabeled_weight, "n_unlabeled": len(logits) - n}
        losses = {"supervised": supervised.detach(), "entropy": entropy.detach()}
        return StepResult({k: float(v) for k, v in losses.items()}, info)

    def deploy_network(self):
        return self.network

    def stateful(self):
        return {
            "network": self.network,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "scaler": self.scaler,
        }
'''


@pytest.fixture
def plugin_registries(monkeypatch):
    """The registry and the catalogue as they are; what a test registers is gone after it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(method_catalogue, "_METHODS", dict(method_catalogue._METHODS))


def _import_file(path: Path, monkeypatch) -> None:
    """Import ``path`` as a plugin is imported: a module of its own in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)
    spec.loader.exec_module(module)


def _real_cases(hippocampus_dir: Path, folder: Path) -> list:
    """Two labeled hippocampus cases and one unlabeled, as --images/--labels/--unlabeled."""
    for kind in ("images", "labels", "unlabeled"):
        (folder / kind).mkdir(parents=True)
    for name in ("hippocampus_001", "hippocampus_003"):
        shutil.copy(hippocampus_dir / "imagesTr" / f"{name}.nii.gz", folder / "images")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{name}.nii.gz", folder / "labels")
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_004.nii.gz", folder / "unlabeled")
    return ["--images", folder / "images", "--labels", folder / "labels"]


def test_a_method_is_one_file(hippocampus_dir, tmp_path, plugin_registries, monkeypatch, capsys):
    plugin = tmp_path / "semisupseg_toy_method.py"
    plugin.write_text(TOY_METHOD)
    assert "toy" not in method_catalogue.method_names()
    _import_file(plugin, monkeypatch)

    info = method_catalogue.method_info("toy")
    assert info is not None and "toy" in method_catalogue.method_names()
    assert info.description.startswith("Toy: one 3D network")
    assert (info.uses_unlabeled, info.needs_2d_encoder) == (True, False)
    help_text = "weight of the entropy of the unlabeled patches' prediction"
    assert info.options == (OptionInfo("unlabeled_weight", 0.5, help_text, NOT_PUBLISHED),)

    data = _real_cases(hippocampus_dir, tmp_path / "data")
    train = ["train", *data, "--method", "toy", "--device", "cpu", "--iterations", 2]
    train += [*tiny_set_arguments(), "--set", "method.unlabeled_weight=0.25"]
    without_unlabeled = train + ["--out", tmp_path / "refused"]
    code, events = run_cli(without_unlabeled, tmp_path / "events.jsonl")
    assert code == EXIT_FAILED and "'toy' learns from unlabeled images" in events[-1]["message"]

    train += ["--unlabeled", tmp_path / "data" / "unlabeled", "--out", tmp_path / "run"]
    code, events = run_cli(train, tmp_path / "events.jsonl")
    assert code == EXIT_OK, events[-1]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == [1, 2]
    assert all(e["metrics"]["unlabeled_weight"] == 0.25 for e in progress)  # the --set value
    assert all(e["metrics"]["n_unlabeled"] == 1 for e in progress)
    assert all(math.isfinite(e["loss"]["entropy"]) for e in progress)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["method"], config["method_options"]) == ("toy", {"unlabeled_weight": 0.25})
    assert (tmp_path / "run" / "model.pt").is_file()

    bad = [
        a if a != "method.unlabeled_weight=0.25" else "method.unlabeled_weight=-1" for a in train
    ]
    code, events = run_cli(bad[:-1] + [tmp_path / "bad"], tmp_path / "events.jsonl")
    assert code == EXIT_FAILED
    assert "method.unlabeled_weight must be 0 or more, got -1" in events[-1]["message"]

    capsys.readouterr()
    assert cli.main(["methods", "toy"]) == EXIT_OK
    listing = capsys.readouterr().out
    assert f"method.unlabeled_weight = 0.5: {help_text}" in listing
