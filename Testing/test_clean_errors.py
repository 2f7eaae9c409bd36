"""Every failure a user can cause is one clean message that names the file or the setting,
exit code 1, no traceback unless --debug; and nothing is computed or written before it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from backend_helpers import run_cli, tiny_set_arguments, train_arguments, write_tiny_dataset
from SemiSupSegLib.backend import cli
from SemiSupSegLib.protocol import EXIT_FAILED


@pytest.fixture
def data(tmp_path):
    write_tiny_dataset(tmp_path)
    return tmp_path


def _train(data: Path, *extra, out=None):
    arguments = train_arguments(data, out or data / "run", "--iterations", 2, *extra)
    return run_cli(arguments, data / "events.jsonl")


def _assert_clean(code, events, capsys, *fragments):
    assert code == EXIT_FAILED
    assert events[-1]["event"] == "error"
    for fragment in fragments:
        assert fragment in events[-1]["message"], events[-1]["message"]
    assert "Traceback" not in capsys.readouterr().err
    assert not any("Traceback" in e for e in events[-1].get("errors", []))
    assert not any(e["event"] == "progress" for e in events)  # nothing computed first


@pytest.mark.parametrize(
    "setting, named",
    [
        ("iterations=true", "iterations"),
        ("learning_rate=Infinity", "learning_rate"),
        ("learning_rate=NaN", "learning_rate"),
        ("log_every=0", "log_every"),
        ("seed=-1", "seed"),
        ("weight_decay=-0.1", "weight_decay"),
        ("warmup_fraction=1.5", "warmup_fraction"),
        ("patch_size=[16,16,100000]", "patch_size"),
        ("target_spacing=[1,1,1e999]", "target_spacing"),
        ("flip_axes=[5]", "flip_axes"),
        ("method.ema_decay=0.9", "method.ema_decay"),
    ],
)
def test_a_bad_setting_is_named_before_anything_is_written(data, capsys, setting, named):
    code, events = _train(data, "--set", setting)
    _assert_clean(code, events, capsys, named)
    assert not (data / "run").exists()


def test_an_infinite_spacing_is_named(data, capsys):
    code, events = _train(data, "--spacing", "inf,1,1")
    _assert_clean(code, events, capsys, "target_spacing")


def test_an_output_that_is_a_file_is_named(data, capsys):
    (data / "run").write_text("a file")
    code, events = _train(data)
    _assert_clean(code, events, capsys, str(data / "run"), "is a file")


def test_an_output_that_cannot_be_written_fails_before_training(data, capsys):
    if not Path("/sys").is_dir():
        pytest.skip("needs a folder nobody may write into (/sys on Linux)")
    out = Path("/sys/semisupseg-test/run")
    code, events = _train(data, out=out)
    _assert_clean(code, events, capsys, "/sys/semisupseg-test")


def test_an_events_file_that_cannot_be_created_is_a_clean_error(data, capsys):
    (data / "blocker").write_text("a file where a folder should be")
    events = data / "blocker" / "sub" / "events.jsonl"
    code = cli.main(["predict", "--run", str(data), "--input", str(data), "--out",
                     str(data / "p"), "--events", str(events)])  # fmt: skip
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "cannot write the events file" in err and str(data / "blocker") in err
    assert "Traceback" not in err


def test_a_job_file_that_is_not_utf8_or_nested_too_deeply_is_named(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_bytes(b'{"version": 1, "method": "\xff\xfe"}')
    code, events = run_cli(["run", job], tmp_path / "events.jsonl")
    _assert_clean(code, events, capsys, str(job), "UTF-8")
    job.write_text("[" * 100_000 + "]" * 100_000)
    code, events = run_cli(["run", job], tmp_path / "events.jsonl")
    _assert_clean(code, events, capsys, str(job), "nested too deeply")


def test_an_unexpected_error_is_one_short_message(tmp_path, capsys, monkeypatch):
    """The generic handler cuts a huge argument, and keeps the traceback for --debug."""

    def fail(args, events):
        raise RuntimeError("x" * 50_000_000)

    monkeypatch.setattr(cli, "_run_job", fail)
    events_path = tmp_path / "events.jsonl"
    code, events = run_cli(["run", tmp_path / "job.json"], events_path)
    assert code == EXIT_FAILED
    assert len(events_path.read_text()) < 10_000
    assert events[-1]["message"].startswith("RuntimeError: xxx")
    assert "more characters" in events[-1]["message"]
    assert "Traceback" not in capsys.readouterr().err

    code, events = run_cli(["run", tmp_path / "job.json", "--debug"], events_path)
    assert "Traceback" in events[-1]["errors"][0]
    assert "Traceback" in capsys.readouterr().err


def _write_label(path: Path, value: int) -> None:
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    label[label == 2] = value
    sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8)), str(path))


def test_a_label_value_beyond_a_gap_names_its_file(data, capsys):
    """7 among 0..2 would train five empty classes: the file holding 7 is named."""
    odd = data / "labels" / "case1.nii.gz"
    _write_label(odd, 7)
    code, events = _train(data)
    _assert_clean(code, events, capsys, str(odd), "gap", "3, 4, 5, 6")


def test_a_manifest_declaring_a_gap_is_refused(data, capsys):
    manifest = {
        "labels": {"0": "background", "1": "a", "7": "b"},
        "modality": {"0": "MRI"},
        "training": [
            {"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"} for i in range(3)
        ],
    }
    for index in range(3):
        _write_label(data / "labels" / f"case{index}.nii.gz", 7)
    (data / "dataset.json").write_text(json.dumps(manifest))
    arguments = ["train", "--data", data, "--method", "supervised", "--iterations", 1,
                 "--device", "cpu", "--out", data / "run", *tiny_set_arguments()]  # fmt: skip
    code, events = run_cli(arguments, data / "events.jsonl")
    _assert_clean(code, events, capsys, str(data / "dataset.json"), "without gaps")
