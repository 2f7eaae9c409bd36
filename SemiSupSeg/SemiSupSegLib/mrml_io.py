"""Scene <-> files with MRML's own classes: volumes through storage nodes, segmentations
through the Segmentations logic with explicit segment IDs in a fixed order.

Uses only MRML classes (``vtkMRMLScene`` passed in, storage nodes,
``vtkSlicerSegmentationsModuleLogic`` static methods), so the same code runs in Slicer and
against the ``slicer-core`` wheel in pytest. Nodes created only to move data are removed
again (``temporaryNodes``): exporting leaves the scene as it was.
"""

import contextlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

Colour = Tuple[float, float, float]


class SceneDataError(ValueError):
    """Scene data that cannot be exported or imported; the message names the node or file."""


def _slicer():
    import slicer

    return slicer


def ensureSegmentationConverters() -> None:
    """Register the labelmap <-> surface converter rules if nobody has (slicer-core).

    In Slicer the Segmentations module registers them at startup and this does nothing.
    """
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    ):
        if hasattr(slicer, rule):
            factory.RegisterConverterRule(getattr(slicer, rule)())


@contextlib.contextmanager
def temporaryNodes(scene) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block (also on errors)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [
            scene.GetNthNode(i)
            for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in before
        ]
        for node in reversed(added):
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)


# ------------------------------------------------------------------------ volumes


def writeVolumeNode(node, path, compress: bool = True) -> Path:
    """Write a scalar or labelmap volume node to ``path`` without touching its storage node.

    The node's own grid is written (its parent transform is not applied). ``compress=False``
    writes raw voxels: job inputs are read once, and gzip is most of the time of an export.
    """
    slicer = _slicer()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if node is None or node.GetImageData() is None:
        raise SceneDataError(f"{_nodeName(node)}: the volume has no image data")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise SceneDataError(f"{_nodeName(node)}: could not write {path}")
    return path


def readVolumeNode(scene, path, name: Optional[str] = None, labelmap: bool = False):
    """Load an image file into a new volume node (with storage and display nodes)."""
    slicer = _slicer()
    path = Path(path)
    if not path.exists():
        raise SceneDataError(f"{path}: no such file")
    nodeClass = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(nodeClass, name or path.name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(False)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise SceneDataError(f"{path}: could not read this image")
    node.CreateDefaultDisplayNodes()
    return node


# ------------------------------------------------------------------ segmentations


def isSegmentation(node) -> bool:
    return node is not None and node.IsA("vtkMRMLSegmentationNode")


def isLabelmap(node) -> bool:
    return node is not None and node.IsA("vtkMRMLLabelMapVolumeNode")


def labelsVersion(labelsNode) -> Tuple:
    """Changes whenever the class names or colours of a segmentation or labelmap may have
    changed (renamed or recoloured segments; painted voxels or another colour table), so that a
    class table computed from it can be cached."""
    if isSegmentation(labelsNode):
        segmentation = labelsNode.GetSegmentation()
        segments = segmentation.GetNumberOfSegments()
        return (
            labelsNode.GetID(),
            segmentation.GetMTime(),
            tuple(segmentation.GetNthSegment(i).GetMTime() for i in range(segments)),
        )
    image = labelsNode.GetImageData()
    display = labelsNode.GetDisplayNode()
    colourNode = display.GetColorNode() if display is not None else None
    return (
        labelsNode.GetID(),
        labelsNode.GetMTime(),
        image.GetMTime() if image is not None else 0,
        display.GetMTime() if display is not None else 0,
        colourNode.GetMTime() if colourNode is not None else 0,
    )


def segmentNames(segmentationNode) -> List[str]:
    """Segment names in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    return [
        segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
    ]


def segmentColours(segmentationNode) -> Dict[str, Colour]:
    segmentation = segmentationNode.GetSegmentation()
    colours = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        colours[segment.GetName()] = tuple(float(c) for c in segment.GetColor())
    return colours


def labelmapClasses(labelmapNode) -> Dict[int, str]:
    """Label value -> name for the values present in a labelmap (names from its colour node)."""
    import numpy as np

    slicer = _slicer()
    values = [int(v) for v in np.unique(slicer.util.arrayFromVolume(labelmapNode)) if v != 0]
    display = labelmapNode.GetDisplayNode()
    colourNode = display.GetColorNode() if display is not None else None
    names = {}
    for value in values:
        name = colourNode.GetColorName(value) if colourNode is not None else ""
        names[value] = name if name and name != "(none)" else f"label {value}"
    return names


def labelmapColours(labelmapNode) -> Dict[str, Colour]:
    display = labelmapNode.GetDisplayNode()
    colourNode = display.GetColorNode() if display is not None else None
    colours = {}
    if colourNode is None:
        return colours
    for value, name in labelmapClasses(labelmapNode).items():
        rgba = [0.0, 0.0, 0.0, 0.0]
        colourNode.GetColor(value, rgba)
        colours[name] = (rgba[0], rgba[1], rgba[2])
    return colours


def exportSegmentsToFile(
    scene, segmentationNode, classNames: Sequence[str], referenceVolume, path, compress: bool = True
) -> Path:
    """Write a label map where segment ``classNames[i]`` has label value ``i + 1``.

    The segment IDs are passed explicitly in class order, so label values never shift with the
    segmentation's own order; the grid is the reference volume's own (untransformed) grid, and
    the Segmentations logic maps the segments into it through both nodes' parent transforms.
    """
    with temporaryNodes(scene):
        labelmap = _segmentsInReferenceGrid(scene, segmentationNode, classNames, referenceVolume)
        return writeVolumeNode(labelmap, path, compress)


def exportLabelmapToFile(
    scene,
    labelmapNode,
    valueToClass: Dict[int, int],
    classNames: Sequence[str],
    referenceVolume,
    path,
    compress: bool = True,
) -> Path:
    """Write a labelmap volume in the reference volume's grid, renumbered by ``valueToClass``
    (class value ``i + 1`` is ``classNames[i]``; other values become 0).

    The labelmap may be drawn on another grid and either node may be under a transform: it goes
    through a temporary segmentation and the same export as a segmentation (nearest neighbour,
    both parent transforms applied). Raises SceneDataError if no label falls inside the volume.
    """
    import numpy as np
    import vtk

    slicer = _slicer()
    if labelmapNode is None or labelmapNode.GetImageData() is None:
        raise SceneDataError(f"{_nodeName(labelmapNode)}: the labelmap has no image data")
    source = slicer.util.arrayFromVolume(labelmapNode)
    lookup = np.zeros(int(max([int(source.max())] + list(valueToClass))) + 1, dtype=np.uint8)
    for value, target in valueToClass.items():
        lookup[int(value)] = int(target)
    remapped = lookup[np.clip(source, 0, None).astype(np.int64)]
    ensureSegmentationConverters()
    with temporaryNodes(scene):
        copy = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SemiSupSeg export")
        copy.CopyOrientation(labelmapNode)
        copy.SetAndObserveTransformNodeID(labelmapNode.GetTransformNodeID())
        image = labelmapNode.GetImageData().NewInstance()
        image.DeepCopy(labelmapNode.GetImageData())
        copy.SetAndObserveImageData(image)
        slicer.util.updateVolumeFromArray(copy, remapped)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SemiSupSeg export")
        # Same parent as the labelmap: ImportLabelmapToSegmentationNode applies the transform
        # between two different parents twice (Slicer 5.8.0 and current main).
        segmentation.SetAndObserveTransformNodeID(labelmapNode.GetTransformNodeID())
        ids = vtk.vtkStringArray()
        for name in classNames:
            ids.InsertNextValue(segmentation.GetSegmentation().AddEmptySegment("", name))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            copy, segmentation, ids
        ):
            raise SceneDataError(f"{_nodeName(labelmapNode)}: could not read the labelmap")
        labelmap = _segmentsInReferenceGrid(scene, segmentation, classNames, referenceVolume)
        if remapped.any() and not slicer.util.arrayFromVolume(labelmap).any():
            raise SceneDataError(
                f"{_nodeName(labelmapNode)}: no label lies inside volume "
                f"{_nodeName(referenceVolume)}; is it the labelmap of another volume?"
            )
        return writeVolumeNode(labelmap, path, compress)


def _segmentsInReferenceGrid(scene, segmentationNode, classNames: Sequence[str], referenceVolume):
    """A new labelmap node in ``referenceVolume``'s grid: ``classNames[i]`` has value ``i + 1``."""
    slicer = _slicer()
    import vtk

    ensureSegmentationConverters()
    segmentation = segmentationNode.GetSegmentation()
    ids = vtk.vtkStringArray()
    for name in classNames:
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        if not segmentId:
            raise SceneDataError(f"{_nodeName(segmentationNode)}: no segment named {name!r}")
        ids.InsertNextValue(segmentId)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SemiSupSeg export")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentationNode,
        ids,
        labelmap,
        referenceVolume,
        slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
    )
    if not ok or labelmap.GetImageData() is None:
        raise SceneDataError(
            f"{_nodeName(segmentationNode)}: could not export the segments as a label map"
        )
    return labelmap


def importLabelmapAsSegmentation(
    scene,
    labelmapPath,
    classNames: Sequence[str],
    colours: Dict[str, Colour],
    referenceVolume,
    name: str,
):
    """A new segmentation node whose segment ``classNames[i]`` holds label value ``i + 1``.

    Segments are created first, with the labeled cases' names and colours, and the label map is
    imported into them by ID, so names and colours never depend on the file's colour table.
    """
    slicer = _slicer()
    import vtk

    ensureSegmentationConverters()
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    if referenceVolume is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
    segmentation = segmentationNode.GetSegmentation()
    ids = vtk.vtkStringArray()
    for className in classNames:
        colour = colours.get(className, (0.5, 0.5, 0.5))
        ids.InsertNextValue(segmentation.AddEmptySegment("", className, list(colour)))
    try:
        with temporaryNodes(scene):
            labelmap = readVolumeNode(scene, labelmapPath, f"{name} labels", labelmap=True)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentationNode, ids
            )
            if not ok:
                raise SceneDataError(f"{labelmapPath}: could not import it as a segmentation")
    except Exception:
        removeNodeWithDependents(scene, segmentationNode)
        raise
    return segmentationNode


def removeNodeWithDependents(scene, node) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or not scene.IsNodePresent(node):
        return
    dependents = []
    for i in range(
        node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0
    ):
        dependents.append(node.GetNthDisplayNode(i))
    for i in range(
        node.GetNumberOfStorageNodes() if hasattr(node, "GetNumberOfStorageNodes") else 0
    ):
        dependents.append(node.GetNthStorageNode(i))
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and scene.IsNodePresent(dependent):
            scene.RemoveNode(dependent)


def _nodeName(node) -> str:
    if node is None:
        return "(no node)"
    return node.GetName() or node.GetID() or node.GetClassName()
