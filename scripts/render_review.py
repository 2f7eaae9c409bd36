"""Draw a review case as the Slicer panel shows it, from a real session's files (matplotlib).

    .venv/bin/python scripts/screenshot_session.py SESSION      # a real two-round session
    .venv/bin/python scripts/render_review.py SESSION [OUTPUT.png]

Reads the files the module loads for a review case (the image, the pseudo-mask label map and
the uncertainty map of the first case of round 1's table, from its scores.csv) and draws the slice
through most of the pseudo-mask twice: the pseudo-mask's segments over the image, in the
labeled cases' segment colours; and the uncertainty map over the image with the Inferno colour
map at the panel's default opacity (40%), with the segments' outlines. Slicer's views cannot be
rendered on a machine without Slicer; this draws the same layers from the same files.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSupSeg"))
sys.path.insert(0, str(REPO / "scripts"))

from screenshot_session import render_command  # noqa: E402
from SemiSupSegLib.results import Session  # noqa: E402

OUTPUT = REPO / "Resources" / "Screenshots" / "review.png"
UNCERTAINTY_OPACITY = 0.4  # the panel's default (SemiSupSegParameterNode.uncertaintyOpacity)
SEGMENT_OPACITY = 0.5  # Slicer's default fill opacity of segments in slice views


def voxels(path: str):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image).astype(np.float32), image.GetSpacing()


def render(session_folder: Path, output: Path) -> Path:
    session = Session.load(session_folder)
    if not session.rounds or session.classes is None:
        raise SystemExit(f"{session.path}: no round to show (scripts/screenshot_session.py)")
    rows = session.reviewRows(session.rounds[0].round)
    if not rows:
        raise SystemExit(f"{session.path}: round {session.rounds[0].round} has no results")
    row = rows[0]  # the first case the table offers
    image, spacing = voxels(row.image)
    labels, _ = voxels(row.label)
    uncertainty, _ = voxels(row.uncertainty)
    if not (image.shape == labels.shape == uncertainty.shape):
        raise SystemExit(f"{row.case}: image, pseudo-mask and uncertainty differ in size")
    k = int(np.argmax((labels > 0).sum(axis=(1, 2))))  # the slice with most of the pseudo-mask
    names = session.classes.names
    colours = [session.classes.colours.get(name, (0.5, 0.5, 0.5)) for name in names]
    segments = ListedColormap([(0, 0, 0, 0)] + [(*c, SEGMENT_OPACITY) for c in colours])
    aspect = spacing[1] / spacing[0]
    low, high = np.percentile(image[k], [1, 99.5])

    figure, axes = plt.subplots(1, 2, figsize=(8.4, 4.6), dpi=120)
    for axis in axes:
        axis.imshow(image[k], cmap="gray", vmin=low, vmax=high, aspect=aspect)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0].imshow(
        labels[k], cmap=segments, vmin=0, vmax=len(names), interpolation="nearest", aspect=aspect
    )
    shown = axes[1].imshow(uncertainty[k], cmap="inferno", alpha=UNCERTAINTY_OPACITY, aspect=aspect)
    for value, colour in enumerate(colours, start=1):
        for axis in axes:
            if (labels[k] == value).any():
                axis.contour(labels[k] == value, levels=[0.5], colors=[colour], linewidths=1.2)
    axes[0].set_title("Pseudo-mask")
    axes[1].set_title(f"Uncertainty ({int(UNCERTAINTY_OPACITY * 100)}% Inferno overlay)")
    bar = figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    bar.solids.set_alpha(1)
    bar.set_label("uncertainty")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    axes[0].legend(handles, names, loc="lower left", fontsize=8, framealpha=0.8)
    figure.suptitle(
        f"{row.case}, round {row.round}: score {row.score:.4f} (first of "
        f"{len(rows)}), slice {k + 1} of {image.shape[0]}",
        fontsize=10,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
    return output


if __name__ == "__main__":
    render_command(render, OUTPUT, __doc__)
