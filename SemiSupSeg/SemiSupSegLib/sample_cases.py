"""Tiny labeled and unlabeled cases made from Slicer's MRHead sample, for the in-Slicer tests
and for trying the module in a minute: crops of the head with a two-class threshold
segmentation ("bright" and "dark" tissue). Runs in Slicer only (SampleData, slicer.util)."""

from typing import List, Tuple

SAMPLE_CLASSES = ("bright", "dark")
CROP = (24, 48, 48)  # slices (k), rows (j), columns (i)


def makeSampleCases(count: int = 3) -> Tuple[object, List[object]]:  # pragma: no cover
    """Load MRHead and add ``count`` small volume crops of it to the scene."""
    import numpy as np
    import SampleData
    import slicer
    import vtk

    head = SampleData.downloadSample("MRHead")
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
