"""Tiny labeled and unlabeled cases made from Slicer's MRHead sample, for the in-Slicer tests
and for trying the module in a minute: crops of the head with a two-class threshold
segmentation ("bright" and "dark" tissue). Runs in Slicer (SampleData, slicer.util); the
in-Slicer tests skip, saying why, where the backend's packages or the download are missing."""

from typing import List, Sequence, Tuple

from SemiSupSegLib.dependencies import missingHere

SAMPLE_CLASSES = ("bright", "dark")
CROP = (24, 48, 48)  # slices (k), rows (j), columns (i)


class SampleDataUnavailable(RuntimeError):
    """MRHead could not be downloaded (e.g. a build machine without network access)."""


def sampleCasesOrSkip(testCase, requirements: Sequence[str], count: int = 3):
    """``makeSampleCases(count)`` for an in-Slicer test, or skip the test saying why: the
    backend's packages are not in Slicer's Python, or MRHead cannot be downloaded. A skipped
    test passes under ctest (unittest.SkipTest), so build machines without them stay green."""
    missing = missingHere(requirements)
    if missing:
        testCase.skipTest(
            f"SemiSupSeg's backend needs {', '.join(missing)} in Slicer's Python, which this "
            "Slicer does not have (the module's Install... button adds them)"
        )
    try:
        return makeSampleCases(count)
    except SampleDataUnavailable as err:
        testCase.skipTest(str(err))


def makeSampleCases(count: int = 3) -> Tuple[object, List[object]]:
    """Load MRHead and add ``count`` small volume crops of it to the scene.

    Raises SampleDataUnavailable if MRHead cannot be downloaded."""
    import numpy as np
    import SampleData
    import slicer
    import vtk

    try:
        head = SampleData.downloadSample("MRHead")
    except Exception as err:
        raise SampleDataUnavailable(f"the MRHead sample could not be downloaded ({err})") from err
    if head is None:
        raise SampleDataUnavailable("the MRHead sample could not be downloaded")
    voxels = slicer.util.arrayFromVolume(head)
    matrix = vtk.vtkMatrix4x4()
    head.GetIJKToRASMatrix(matrix)
    ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
    depth, rows, columns = CROP
    centre = np.array(voxels.shape) // 2
    volumes = []
    for index in range(count):
        k0 = int(centre[0] - depth // 2 + (index - count // 2) * 8)
        j0 = int(centre[1] - rows // 2)
        i0 = int(centre[2] - columns // 2)
        crop = np.array(
            voxels[k0 : k0 + depth, j0 : j0 + rows, i0 : i0 + columns], dtype=np.float32
        )
        shifted = ijkToRas.copy()
        shifted[:3, 3] = (ijkToRas @ np.array([i0, j0, k0, 1.0]))[:3]
        volumes.append(
            slicer.util.addVolumeFromArray(crop, shifted, f"SemiSupSeg sample {index + 1}")
        )
    return head, volumes


def addThresholdSegmentation(volume, name: str = ""):  # pragma: no cover
    """A segmentation of ``volume`` with segments 'bright' (top quartile) and 'dark'."""
    import numpy as np
    import slicer

    voxels = slicer.util.arrayFromVolume(volume)
    low, high = np.percentile(voxels, [35, 75])
    masks = {
        "bright": (voxels >= high).astype(np.uint8),
        "dark": ((voxels > 0) & (voxels < low)).astype(np.uint8),
    }
    segmentation = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", name or f"{volume.GetName()} segmentation"
    )
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    colours = {"bright": (0.95, 0.75, 0.2), "dark": (0.2, 0.5, 0.9)}
    for className in SAMPLE_CLASSES:
        segmentId = segmentation.GetSegmentation().AddEmptySegment(
            "", className, list(colours[className])
        )
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            masks[className], segmentation, segmentId, volume
        )
    return segmentation
