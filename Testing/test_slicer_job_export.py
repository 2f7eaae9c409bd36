"""Scene -> job folder with real MRML nodes (slicer-core): volumes and segmentations written
through storage nodes, label values following segment names, class mismatch messages naming
the case, unlabeled volumes from the scene or a folder, and the scene left as it was."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from SemiSupSegLib import mrml_io
from SemiSupSegLib.job_export import (
    ClassMismatchError,
    ExportError,
    JobExporter,
    LabeledPair,
    checkClassNames,
    imagesInFolder,
    sanitizeCaseName,
    uniqueName,
)
from SemiSupSegLib.protocol import DEFAULT_BUDGET, JOB_FILE_NAME, TIME_BUDGETS, JobSpec
from SemiSupSegLib.training_options import (
    ENCODER_SETTING,
    OptionsError,
    TrainingOptions,
    budgetLimitOf,
    describeBudgets,
    parseExtraSettings,
)
from slicer_side_helpers import (
    CLASS_NAMES,
    hippocampusCase,
    ijkToRas,
    labelArray,
    labelmapNode,
    newScene,
    nodeIds,
    segmentationFromLabelFile,
)

# ------------------------------------------------------------------ plain Python parts


def test_class_names_follow_the_first_case_and_must_match():
    assert checkClassNames(
        [("a", ["Anterior", "Posterior"]), ("b", ["Posterior", "Anterior"])]
    ) == [
        "Anterior",
        "Posterior",
    ]
    with pytest.raises(ClassMismatchError) as err:
        checkClassNames(
            [("case1", ["Anterior", "Posterior"]), ("case2", ["Anterior", "posterior"])]
        )
    message = str(err.value)
    assert "'case2'" in message and "'case1'" in message
    assert "lacks ['Posterior']" in message and "['posterior'] in addition" in message
    with pytest.raises(ClassMismatchError, match="'c' has several segments named"):
        checkClassNames([("c", ["A", "A"])])
    with pytest.raises(ClassMismatchError, match="'d' has no segments"):
        checkClassNames([("d", [])])
    with pytest.raises(ExportError, match="no labeled cases"):
        checkClassNames([])


def test_case_names_are_file_safe_and_unique(tmp_path):
    assert sanitizeCaseName("MR Head (1)") == "MR_Head_1"
    assert sanitizeCaseName("  ") == "case"
    taken = {"a"}
    assert uniqueName("a", taken) == "a_2"
    assert uniqueName("A", taken) == "A_3"  # case-insensitive: Windows and macOS file systems
    for name in ("b.nii.gz", "a.nrrd", "notes.txt", ".hidden.nrrd"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in imagesInFolder(tmp_path)] == ["a.nrrd", "b.nii.gz"]
    with pytest.raises(ExportError, match="no such folder"):
        imagesInFolder(tmp_path / "missing")


def test_training_options_to_settings():
    options = TrainingOptions(method="mn+em", preset="quick", network="segresnet")
    # a named budget is the job's budget: the backend picks its iterations for its device
    assert options.validate().settings() == {
        "network": "segresnet",
        ENCODER_SETTING: "mobilenetv2_100",
    }
    assert options.budget == "quick"
    assert options.totalIterations() == TIME_BUDGETS["quick"]["time"]  # what the panel shows
    assert replace(options, budgetLimit="memory").totalIterations() == 2000  # a CUDA GPU
    custom = TrainingOptions(
        method="supervised", preset="custom", iterations=7, extraSettings={"batch_size": 1}
    )
    assert custom.settings() == {"iterations": 7, "network": "unet", "batch_size": 1}
    assert custom.budget == DEFAULT_BUDGET
    with pytest.raises(OptionsError, match="device"):
        TrainingOptions(device="tpu").validate()
    with pytest.raises(OptionsError, match="budget limit"):
        TrainingOptions(budgetLimit="patience").validate()
    scratch = TrainingOptions(preset="standard", warmStart=False).forRetraining()
    assert "iterations" not in scratch.settings()  # from scratch: the full budget, any device
    assert scratch.budget == "standard"
    assert custom.forRetraining().settings() == {
        "iterations": 1,
        "network": "unet",
        "batch_size": 1,
    }
    with pytest.raises(OptionsError, match="retraining share"):
        TrainingOptions(retrainShare=0.0).validate()


def test_a_fast_retraining_round_runs_a_share_of_the_budget_of_the_detected_device():
    """Sent as explicit iterations: a fifth of what the budget runs on the CPU, or on the GPU
    the panel found; the job keeps the budget's name."""
    assert TIME_BUDGETS["standard"] == {"time": 1500, "memory": 6000}  # what the numbers assume
    cpu = TrainingOptions(preset="standard").forRetraining()
    assert cpu.settings()["iterations"] == 300  # a fifth of the CPU's 1500
    assert cpu.budget == "standard"
    gpu = TrainingOptions(preset="standard", budgetLimit="memory").forRetraining()
    assert gpu.settings()["iterations"] == 1200  # a fifth of the GPU's 6000
    half = TrainingOptions(preset="thorough", retrainShare=0.5, budgetLimit="memory")
    assert half.forRetraining().totalIterations() == TIME_BUDGETS["thorough"]["memory"] // 2
    assert half.forRetraining().forRetraining().totalIterations() == 7500  # not a share of it


def test_budget_limit_from_the_dependency_probe():
    gpu = {"torch": {"installed": True, "cuda_devices": [{"name": "A100", "memory_gb": 80}]}}
    apple = {"torch": {"installed": True, "cuda_devices": [], "mps": True}}
    assert budgetLimitOf(gpu, "auto") == budgetLimitOf(gpu, "cuda") == "memory"
    assert budgetLimitOf(gpu, "cpu") == budgetLimitOf(gpu, "mps") == "time"
    assert budgetLimitOf(apple, "auto") == "time"  # Apple's GPU is time-limited too
    assert budgetLimitOf(None, "auto") == "time"  # not checked yet
    assert budgetLimitOf({"torch": {"installed": False}}, "auto") == "time"
    text = describeBudgets()
    assert "quick/standard/thorough: 500 / 1500 / 4000 iterations on a CPU" in text
    assert "2000 / 6000 / 15000 on a CUDA GPU" in text


def test_parse_extra_settings():
    assert parseExtraSettings("batch_size=2, patch_size=[32,32,16]; name=abc\nflag=true") == {
        "batch_size": 2,
        "patch_size": [32, 32, 16],
        "name": "abc",
        "flag": True,
    }
    with pytest.raises(OptionsError, match="expected name=value"):
        parseExtraSettings("batch_size")


# ---------------------------------------------------------------- real MRML scene


def nrrd_header(path):
    """The fields of a NRRD file's text header."""
    fields = {}
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("latin-1").rstrip("\n")
            if not line:
                break
            if ": " in line:
                key, value = line.split(": ", 1)
                fields[key] = value
    return fields


@pytest.fixture
def scene_with_cases():
    scene = newScene()
    pairs = []
    for number, order in (("001", None), ("003", [1, 0])):  # second case: segments reversed
        image, label = hippocampusCase(number)
        volume = mrml_io.readVolumeNode(scene, image, f"hippo {number}")
        segmentation = segmentationFromLabelFile(
            scene, label, volume, f"hippo {number} segmentation", order=order
        )
        pairs.append(LabeledPair(volume, segmentation))
    unlabeled = mrml_io.readVolumeNode(scene, hippocampusCase("004")[0], "hippo 004")
    return scene, pairs, unlabeled


def test_export_writes_a_valid_job_and_leaves_the_scene_untouched(tmp_path, scene_with_cases):
    scene, pairs, unlabeled = scene_with_cases
    assert mrml_io.segmentNames(pairs[1].labels) == ["Posterior", "Anterior"]
    folder = tmp_path / "more"
    folder.mkdir()
    shutil.copy(hippocampusCase("006")[0], folder / "extra_case.nii.gz")
    before = nodeIds(scene)
    modified = [pair.labels.GetMTime() for pair in pairs]
    exporter = JobExporter(scene, tmp_path / "job")
    steps = []
    job, table = exporter.export(
        pairs,
        [unlabeled],
        str(folder),
        TrainingOptions(method="supervised", preset="custom", iterations=3),
        progress=lambda done, total, what: steps.append((done, total, what)),
    )
    assert steps == [
        (0, 5, "image of hippo_001"),
        (1, 5, "labels of hippo_001"),
        (2, 5, "image of hippo_003"),
        (3, 5, "labels of hippo_003"),
        (4, 5, "unlabeled hippo_004"),
        (5, 5, "job.json"),
    ]
    assert nodeIds(scene) == before  # temporary labelmap nodes were removed again
    assert [pair.labels.GetMTime() for pair in pairs] == modified
    assert table.names == list(CLASS_NAMES)
    assert set(table.colours) == set(CLASS_NAMES)

    loaded = JobSpec.load(tmp_path / "job" / "job.json")
    assert loaded.classes == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert [c.name for c in loaded.labeled] == ["hippo_001", "hippo_003"]
    assert [c.name for c in loaded.unlabeled] == ["hippo_004", "extra_case"]
    assert loaded.unlabeled[1].image == str((folder / "extra_case.nii.gz").resolve())
    assert loaded.output == "." and loaded.settings["iterations"] == 3
    assert exporter.exportedNodes["hippo_004"] is unlabeled

    resolved = loaded.resolve(tmp_path / "job")
    for number, case in zip(("001", "003"), resolved.labeled):
        truth = labelArray(hippocampusCase(number)[1])
        exported = labelArray(case.label)
        # label values follow the segment names, whatever the segmentation's own order
        np.testing.assert_array_equal(exported, truth)
        image = labelArray(case.image)
        assert image.shape == truth.shape
    written = list((tmp_path / "job" / "inputs").rglob("*.nrrd"))
    assert len(written) == 5
    for path in written:  # job inputs are not gzipped: the export is not spent compressing
        assert nrrd_header(path)["encoding"] == "raw", path


def test_a_named_budget_is_written_as_the_jobs_budget_and_custom_as_iterations(
    tmp_path, scene_with_cases
):
    """A GPU user's job must get the GPU schedule: a named budget sends no iterations."""
    scene, pairs, unlabeled = scene_with_cases
    written = {}
    for preset in ("thorough", "custom"):
        options = TrainingOptions(method="supervised", preset=preset, iterations=42)
        JobExporter(scene, tmp_path / preset).export(pairs, [unlabeled], None, options)
        written[preset] = json.loads((tmp_path / preset / JOB_FILE_NAME).read_text())
    assert written["thorough"]["budget"] == "thorough"
    assert "iterations" not in written["thorough"]["settings"]
    assert written["thorough"]["plan"] is True
    assert written["custom"]["settings"]["iterations"] == 42
    assert written["custom"]["budget"] == DEFAULT_BUDGET


def file_geometry(path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()


def test_labelmap_volumes_can_be_the_labels(tmp_path):
    scene = newScene()
    image, label = hippocampusCase("001")
    volume = mrml_io.readVolumeNode(scene, image, "vol")
    truth = labelArray(label)
    # names in another value order than the segmentations': 1 Posterior, 2 Anterior
    labelmap = labelmapNode(
        scene, np.where(truth > 0, 3 - truth, 0), ijkToRas(volume), ["Posterior", "Anterior"]
    )
    job, table = JobExporter(scene, tmp_path / "job").export(
        [LabeledPair(volume, labelmap)], options=TrainingOptions(method="supervised")
    )
    assert table.names == ["Posterior", "Anterior"]
    assert table.colours["Anterior"] == (0.0, 0.0, 1.0)
    exported = labelArray(tmp_path / "job" / job.labeled[0].label)
    np.testing.assert_array_equal(exported, np.where(truth > 0, 3 - truth, 0))


def test_a_labelmap_on_another_grid_is_resampled_to_its_volume(tmp_path):
    """A labelmap with another extent, origin and axis direction than its volume (padded and
    flipped left-right) is written voxel for voxel in the volume's grid."""
    scene = newScene()
    image, label = hippocampusCase("001")
    volume = mrml_io.readVolumeNode(scene, image, "vol")
    truth = labelArray(label)
    pad_k, pad_j, pad_i = 3, 4, 5
    padded = np.pad(truth, ((pad_k, pad_k), (pad_j, pad_j), (pad_i, pad_i)))[:, :, ::-1]
    columns = truth.shape[2]
    to_original = np.array(  # the new grid's ijk -> the volume's ijk
        [[-1, 0, 0, columns + pad_i - 1], [0, 1, 0, -pad_j], [0, 0, 1, -pad_k], [0, 0, 0, 1]],
        dtype=float,
    )
    labelmap = labelmapNode(
        scene, padded, ijkToRas(volume) @ to_original, list(CLASS_NAMES), "other grid"
    )
    before = nodeIds(scene)
    job, _table = JobExporter(scene, tmp_path / "job").export(
        [LabeledPair(volume, labelmap)], options=TrainingOptions(method="supervised")
    )
    assert nodeIds(scene) == before
    image_file = tmp_path / "job" / job.labeled[0].image
    label_file = tmp_path / "job" / job.labeled[0].label
    assert file_geometry(label_file) == file_geometry(image_file)
    np.testing.assert_array_equal(labelArray(label_file), truth)


ROTATE_AND_SHIFT = np.array(  # 90 degrees about S, then 10 mm right, 5 mm posterior, 3 mm up
    [[0, -1, 0, 10], [1, 0, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=float
)


@pytest.mark.parametrize("transformed", ["volume", "labelmap"])
def test_labels_follow_the_transform_their_volume_is_under(tmp_path, transformed):
    """One node is under a linear transform, the other was drawn where the user sees it (the
    same transform hardened into its grid): the labels are written in the volume's own grid."""
    slicer = pytest.importorskip("slicer")
    scene = newScene()
    image, label = hippocampusCase("001")
    volume = mrml_io.readVolumeNode(scene, image, "vol")
    truth = labelArray(label)
    local = ijkToRas(volume)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(ROTATE_AND_SHIFT))
    if transformed == "volume":
        volume.SetAndObserveTransformNodeID(transform.GetID())
        labelmap = labelmapNode(scene, truth, ROTATE_AND_SHIFT @ local, list(CLASS_NAMES))
    else:
        volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ROTATE_AND_SHIFT @ local))
        labelmap = labelmapNode(scene, truth, local, list(CLASS_NAMES))
        labelmap.SetAndObserveTransformNodeID(transform.GetID())
    job, _table = JobExporter(scene, tmp_path / "job").export(
        [LabeledPair(volume, labelmap)], options=TrainingOptions(method="supervised")
    )
    image_file = tmp_path / "job" / job.labeled[0].image
    label_file = tmp_path / "job" / job.labeled[0].label
    assert file_geometry(label_file) == file_geometry(image_file)
    np.testing.assert_array_equal(labelArray(label_file), truth)


def test_a_labelmap_outside_its_volume_is_an_error_naming_both(tmp_path):
    scene = newScene()
    image, label = hippocampusCase("001")
    volume = mrml_io.readVolumeNode(scene, image, "vol")
    far_away = ijkToRas(volume) @ np.array(
        [[1, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float
    )
    labelmap = labelmapNode(scene, labelArray(label), far_away, list(CLASS_NAMES), "elsewhere")
    with pytest.raises(mrml_io.SceneDataError, match="elsewhere: no label lies inside volume vol"):
        JobExporter(scene, tmp_path / "job").export(
            [LabeledPair(volume, labelmap)], options=TrainingOptions(method="supervised")
        )


def test_mismatched_segment_names_name_the_case(tmp_path, scene_with_cases):
    scene, pairs, _ = scene_with_cases
    pairs[1].labels.GetSegmentation().GetNthSegment(0).SetName("posterior hippocampus")
    with pytest.raises(ClassMismatchError) as err:
        JobExporter(scene, tmp_path / "job").export(pairs)
    assert "'hippo 003 segmentation'" in str(err.value)
    assert not (tmp_path / "job" / "job.json").exists()


def test_missing_inputs_are_reported(tmp_path, scene_with_cases):
    scene, pairs, _ = scene_with_cases
    with pytest.raises(ExportError, match="labeled case 2: pick both"):
        JobExporter(scene, tmp_path / "job").export([pairs[0], LabeledPair(pairs[1].volume, None)])
    with pytest.raises(ExportError, match="no labeled cases"):
        JobExporter(scene, tmp_path / "job").export([])
