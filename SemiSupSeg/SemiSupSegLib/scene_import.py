"""Results -> scene: a reviewed case's volume, its pseudo-mask as a segmentation with the
labeled cases' segment names and colours, and its uncertainty map as a scalar volume with a
perceptual colour map (Inferno or Viridis) for the foreground layer.

Nodes made here carry attributes (``SemiSupSeg.case``, ``SemiSupSeg.round``,
``SemiSupSeg.role``) so that selecting a case again reuses them instead of loading twice.
MRML classes only (works in Slicer and with slicer-core); showing the layers in the slice views
is done by the Logic with ``slicer.util.setSliceViewerLayers``.
"""

from dataclasses import dataclass
from typing import Any, Optional

from SemiSupSegLib import mrml_io
from SemiSupSegLib.job_export import ClassTable
from SemiSupSegLib.results import ReviewRow

CASE_ATTRIBUTE = "SemiSupSeg.case"
ROUND_ATTRIBUTE = "SemiSupSeg.round"
ROLE_ATTRIBUTE = "SemiSupSeg.role"
ROLE_IMAGE = "image"
ROLE_PSEUDO_MASK = "pseudo-mask"
ROLE_UNCERTAINTY = "uncertainty"

COLOUR_MAPS = ("Inferno", "Viridis")


def colourNodeId(name: str) -> str:
    """The ID Slicer gives its built-in colour table files (e.g. Inferno.txt)."""
    return f"vtkMRMLColorTableNodeFile{name}.txt"


@dataclass
class LoadedCase:
    case: str
    round: int
    volume: Any
    segmentation: Any
    uncertainty: Any


def findCaseNode(scene, case: str, role: str, roundNumber: Optional[int] = None):
    """A node this module loaded for ``case`` in ``role`` (and round), or None."""
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(CASE_ATTRIBUTE) != case or node.GetAttribute(ROLE_ATTRIBUTE) != role:
            continue
        if roundNumber is not None and node.GetAttribute(ROUND_ATTRIBUTE) != str(roundNumber):
            continue
        return node
    return None


def _tag(node, case: str, role: str, roundNumber: int) -> None:
    node.SetAttribute(CASE_ATTRIBUTE, case)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(ROUND_ATTRIBUTE, str(roundNumber))


def setUncertaintyColours(scene, uncertaintyNode, colourMap: str = "Inferno") -> bool:
    """Show the uncertainty volume with a perceptual colour map; False if the map is absent."""
    display = uncertaintyNode.GetDisplayNode()
    colourNode = scene.GetNodeByID(colourNodeId(colourMap))
    if display is None or colourNode is None:
        return False
    display.SetAndObserveColorNodeID(colourNode.GetID())
    display.AutoWindowLevelOn()
    return True


def loadReviewCase(
    scene,
    row: ReviewRow,
    classes: ClassTable,
    volumeNode=None,
    colourMap: str = "Inferno",
) -> LoadedCase:
    """Load (or find) the case's volume, pseudo-mask and uncertainty map.

    ``volumeNode`` is the scene's own volume when the case came from the scene; otherwise the
    image file is loaded once and reused on later selections.
    """
    case, number = row.case, row.round
    volume = volumeNode or findCaseNode(scene, case, ROLE_IMAGE)
    if volume is None:
        volume = mrml_io.readVolumeNode(scene, row.image, case)
        _tag(volume, case, ROLE_IMAGE, number)

    segmentation = findCaseNode(scene, case, ROLE_PSEUDO_MASK, number)
    if segmentation is None:
        segmentation = mrml_io.importLabelmapAsSegmentation(
            scene,
            row.label,
            classes.names,
            classes.colours,
            volume,
            f"{case} pseudo-mask (round {number})",
        )
        _tag(segmentation, case, ROLE_PSEUDO_MASK, number)

    uncertainty = findCaseNode(scene, case, ROLE_UNCERTAINTY, number)
    if uncertainty is None:
        uncertainty = mrml_io.readVolumeNode(
            scene, row.uncertainty, f"{case} uncertainty (round {number})"
        )
        _tag(uncertainty, case, ROLE_UNCERTAINTY, number)
    setUncertaintyColours(scene, uncertainty, colourMap)
    # results are in the volume's own (untransformed) grid: follow the volume's transform
    transformId = volume.GetTransformNodeID()
    for node in (segmentation, uncertainty):
        if node.GetTransformNodeID() != transformId:
            node.SetAndObserveTransformNodeID(transformId)
    return LoadedCase(case, number, volume, segmentation, uncertainty)
