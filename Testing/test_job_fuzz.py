"""Malformed job files (protocol v1), as a hostile tester writes them: every one ends in one
clean error event naming the field or file at fault (exit 1, no traceback, nothing written
outside the job's folder, nothing trained), and a well-formed job still gives a correct result.

The cases are generated: each top-level field and each training setting gets values of wrong
types and out of range, then come broken files (not JSON, not UTF-8, nested, huge), dangerous
case names and paths, and broken data (2D, vector, gaps in label values, misaligned label).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from backend_helpers import TINY_SETTINGS, run_cli, write_tiny_dataset
from SemiSupSegLib.backend.prediction_manifest import check_complete
from SemiSupSegLib.output_layout import PREDICTIONS_FOLDER
from SemiSupSegLib.protocol import EXIT_FAILED

MISSING = object()  # a field left out of the job
SETTINGS = {**TINY_SETTINGS, "iterations": 1}


class _Payload:
    def __reduce__(self):
        return (exec, ("open('crafted-model-ran', 'w').close()",))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny dataset plus broken files the jobs point at."""
    root = tmp_path_factory.mktemp("fuzz-data")
    write_tiny_dataset(root)
    bad = root / "bad"
    bad.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.float32)), str(bad / "2d.nii.gz"))
    vector = sitk.GetImageFromArray(np.zeros((20, 20, 20, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(bad / "vector.nii.gz"))
    gap = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labels" / "case0.nii.gz")))
    gap[gap == 2] = 7
    sitk.WriteImage(sitk.GetImageFromArray(gap), str(bad / "gap.nii.gz"))
    moved = sitk.ReadImage(str(root / "labels" / "case0.nii.gz"))
    moved.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(moved, str(bad / "misaligned.nii.gz"))
    (bad / "text.nii.gz").write_text("not an image")
    (bad / "notamodel.pt").write_text("not a model")
    torch.save({"format": "semisupseg-checkpoint", "x": _Payload()}, bad / "crafted.pt")
    (bad / "empty-run").mkdir()
    return root


def _base(data: Path) -> Dict[str, Any]:
    image = lambda i: str(data / "images" / f"case{i}.nii.gz")  # noqa: E731
    label = lambda i: str(data / "labels" / f"case{i}.nii.gz")  # noqa: E731
    return {
        "version": 1,
        "method": "supervised",
        "device": "cpu",
        "modality": "MR",
        "classes": {"0": "background", "1": "a", "2": "b"},
        "labeled": [
            {"name": "case0", "image": image(0), "label": label(0)},
            {"name": "case1", "image": image(1), "label": label(1)},
        ],
        "unlabeled": [{"name": "case2", "image": image(2)}],
        "output": "out",
        "settings": dict(SETTINGS),
        "predict_unlabeled": True,
    }


# Values of the wrong type or out of range, per top-level field; the message must name the field.
FIELD_VALUES: Dict[str, List[Any]] = {
    "version": [MISSING, None, 2, "1", True, 1.5, []],
    "method": [None, "", "magic", 1, ["mn"], "x" * 100_000],
    "device": [None, "tpu", 0],
    "modality": ["mr", 3],
    "classes": [None, [], {}, {"a": "b"}, {"0": "bg", "2": "x"}, {"0": "bg", "1": ""},
                {"0": "bg", "1": 5}, {"-1": "x", "0": "bg"}],
    "labeled": [MISSING, None, [], "x", [1], [{}]],
    "unlabeled": ["x", [5], [{"image": 5}]],
    "output": [None, "", 5],
    "settings": [None, [], "x"],
    "predict_unlabeled": ["yes", 1, None],
    "init_from": ["", 5],
    "plan": ["yes", 1, None],
    "budget": ["forever", 3, None],
}  # fmt: skip

# Training settings that cannot work; the message must name the setting.
BAD_SETTINGS: List[Tuple[str, Any]] = [
    ("unknown_setting", 1), ("iterations", True), ("iterations", 0), ("iterations", -5),
    ("iterations", 1.5), ("iterations", "many"), ("iterations", float("inf")),
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("learning_rate", -1),
    ("learning_rate", "fast"), ("batch_size", 0), ("patch_size", [4, 4, 4]),
    ("patch_size", "abc"), ("patch_size", [16, 16]), ("patch_size", [16, 16, 10**9]),
    ("target_spacing", [0, 1, 1]), ("target_spacing", [float("inf"), 1, 1]),
    ("method.unknown", 1), ("network", "nonexistent"), ("network_options", {"bogus": 1}),
    ("network_options", []), ("method_options", []), ("log_every", 0), ("seed", -1),
    ("dropout", 1.0), ("foreground_ratio", 2), ("weight_decay", -1), ("warmup_fraction", 1.5),
    ("modality", "XX"), ("flip_axes", [7]), ("ct_window", [1, 0]), ("weight_average", 1),
]  # fmt: skip


def _cases(data: Path) -> List[Tuple[str, Callable[[Path], None], str]]:
    """(id, write the job into its folder, a fragment the error message must hold)."""
    cases: List[Tuple[str, Callable[[Path], None], str]] = []

    def job_case(case_id: str, change: Callable[[dict], None], expected: str) -> None:
        def write(folder: Path) -> None:
            job = _base(data)
            change(job)
            (folder / "job.json").write_text(json.dumps(job))

        cases.append((case_id, write, expected))

    def set_field(field: str, value: Any) -> Callable[[dict], None]:
        def change(job: dict) -> None:
            if value is MISSING:
                job.pop(field, None)
            else:
                job[field] = copy.deepcopy(value)

        return change

    for field, values in FIELD_VALUES.items():
        for index, value in enumerate(values):
            job_case(f"{field}-{index}", set_field(field, value), f"job.{field}")

    def set_setting(key: str, value: Any) -> Callable[[dict], None]:
        return lambda job: job["settings"].update({key: value})

    for index, (key, value) in enumerate(BAD_SETTINGS):
        named = "bogus" if key == "network_options" and value else key.split(".")[-1]
        job_case(f"setting-{index}-{key}", set_setting(key, value), named)

    def set_case(kind: str, **fields: Any) -> Callable[[dict], None]:
        return lambda job: job[kind][0].update(fields)

    images, bad = data / "images", data / "bad"
    for index, name in enumerate(["../../../escaped", "/tmp/escaped", "a/b", "..", "a\\b", ""]):
        job_case(f"name-{index}", set_case("unlabeled", name=name), "job.unlabeled[0].name")
    job_case("duplicate-name", set_case("unlabeled", name="case0"), "duplicate case names")
    job_case("label-missing", lambda j: j["labeled"][0].pop("label"), "job.labeled[0].label")
    job_case("image-missing", set_case("labeled", image=str(images / "nope.nii.gz")), "nope")
    job_case("image-2d", set_case("labeled", image=str(bad / "2d.nii.gz")), "2d.nii.gz")
    job_case("image-vector", set_case("unlabeled", image=str(bad / "vector.nii.gz")), "vector")
    job_case("image-text", set_case("labeled", image=str(bad / "text.nii.gz")), "text.nii.gz")
    job_case("label-gap", set_case("labeled", label=str(bad / "gap.nii.gz")), "gap.nii.gz")
    job_case("label-moved", set_case("labeled", label=str(bad / "misaligned.nii.gz")), "spacing")
    job_case("init-missing", set_field("init_from", str(bad / "missing.pt")), "missing.pt")
    job_case("init-text", set_field("init_from", str(bad / "notamodel.pt")), "notamodel.pt")
    job_case("init-crafted", set_field("init_from", str(bad / "crafted.pt")), "refused")
    job_case("init-empty-run", set_field("init_from", str(bad / "empty-run")), "empty-run")
    job_case("output-is-file", set_field("output", str(bad / "text.nii.gz")), "text.nii.gz")
    job_case("unknown-field", lambda j: j.update(extra=1), "unknown field")
    job_case("mn-without-unlabeled", lambda j: j.update(method="mn", unlabeled=[]), "unlabeled")

    def raw_case(case_id: str, content: bytes, expected: str) -> None:
        cases.append((case_id, lambda folder: (folder / "job.json").write_bytes(content), expected))

    raw_case("not-json", b"{version: 1", "not valid JSON")
    raw_case("empty-file", b"", "not valid JSON")
    raw_case("not-utf8", b'{"version": 1, "method": "\xff"}', "UTF-8")
    raw_case("utf8-bom", b'\xef\xbb\xbf{"version": 1}', "JSON")
    raw_case("nested", b"[" * 100_000 + b"]" * 100_000, "nested too deeply")
    raw_case("top-level-list", b"[1, 2]", "JSON object")
    raw_case("top-level-string", b'"job"', "JSON object")
    raw_case("nested-setting", json.dumps({**_base(data), "settings": {"method_options": {
        "a": json.loads("[" * 900 + "]" * 900)}}}).encode(), "method")  # fmt: skip
    cases.append(("job-missing", lambda folder: None, "job.json"))
    return cases


def _outcome(folder: Path, capsys) -> Tuple[int, List[dict], str]:
    code, events = run_cli(["run", folder / "job.json"], folder / "events.jsonl")
    return code, events, capsys.readouterr().err


def test_malformed_jobs_end_in_clean_errors(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a crafted model's code would write here
    cases = _cases(data)
    assert len(cases) >= 50
    sentinel = Path("/tmp/escaped.nii.gz")
    results = {"clean": [], "traceback": [], "silently_wrong": [], "vague": []}
    for case_id, write, expected in cases:
        folder = tmp_path / case_id
        folder.mkdir()
        write(folder)
        code, events, stderr = _outcome(folder, capsys)
        last = events[-1] if events else {}
        if "Traceback" in stderr or any("Traceback" in e for e in last.get("errors", [])):
            results["traceback"].append(case_id)
        elif code != EXIT_FAILED or last.get("event") != "error":
            results["silently_wrong"].append(f"{case_id} (exit {code}, {last.get('event')})")
        elif expected.lower() not in last["message"].lower():
            results["vague"].append(f"{case_id}: {last['message'][:300]}")
        else:
            results["clean"].append(case_id)
        assert not any(e["event"] == "progress" for e in events), f"{case_id} trained"
        assert len(last.get("message", "")) <= 2100, case_id
    assert not (tmp_path / "crafted-model-ran").exists()
    assert not sentinel.exists() and not (data.parent / "escaped.nii.gz").exists()
    print(
        f"\n{len(cases)} malformed jobs: " + ", ".join(f"{k} {len(v)}" for k, v in results.items())
    )
    assert results["traceback"] == [] and results["silently_wrong"] == [], results
    assert results["vague"] == [], results["vague"]


def test_a_well_formed_job_gives_a_correct_result(data, tmp_path, capsys):
    """The control: the base job the malformed ones derive from trains and predicts, and its
    prediction keeps the input's geometry in a complete folder."""
    (tmp_path / "job.json").write_text(json.dumps(_base(data)))
    code, events, stderr = _outcome(tmp_path, capsys)
    assert code == 0, events[-1]
    predictions = tmp_path / "out" / PREDICTIONS_FOLDER
    assert check_complete(predictions)["cases"][0]["case"] == "case2"
    result = sitk.ReadImage(str(predictions / "case2.nii.gz"))
    source = sitk.ReadImage(str(data / "images" / "case2.nii.gz"))
    assert result.GetSize() == source.GetSize() and result.GetSpacing() == source.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(result))) <= {0, 1, 2}
