#!/usr/bin/env python3
"""Convert the 2018 Left Atrium challenge set, as UA-MT distributes it, into a dataset the
command line reads.

UA-MT (Yu et al., MICCAI 2019) ships the 100 training cases of the 2018 Atrial Segmentation
Challenge as ``<ID>/mri_norm2.h5`` (arrays ``image`` float32 and ``label`` uint8, both in
(x, y, z) order, cropped around the atrium and z-scored), with ``train.list`` (80 cases) and
``test.list`` (20) beside them. The h5 files do not store a spacing; the challenge's LGE-MRI
is 0.625 mm isotropic. This writes::

    OUT/imagesTr/<ID>.nii.gz  OUT/labelsTr/<ID>.nii.gz  OUT/dataset.json
    OUT/train.list            OUT/test.list

``--source`` is the folder that holds ``2018LA_Seg_Training Set/`` and the two lists, or the
git directory of a clone of that repository (its files are read with ``git show``). The data
is never committed.

    python scripts/convert_left_atrium.py --source /path/to/UA-MT/.git --out ~/data/LA
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import numpy as np
import SimpleITK as sitk

SPACING_MM = 0.625
CASES_FOLDER = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
LISTS = ("train.list", "test.list")


def source_reader(source: Path) -> Callable[[str], bytes]:
    """A function returning the bytes of a file given its path relative to the data folder,
    from a plain folder or from a git directory (``data/`` inside the repository)."""
    if (source / CASES_FOLDER).is_dir():
        return lambda relative: (source / relative).read_bytes()
    if (source / "HEAD").is_file() and (source / "objects").is_dir():

        def from_git(relative: str) -> bytes:
            shown = subprocess.run(
                ["git", f"--git-dir={source}", "show", f"HEAD:data/{relative}"],
                capture_output=True,
                check=False,
            )
            if shown.returncode != 0:
                raise SystemExit(f"{source}: no data/{relative} ({shown.stderr.decode().strip()})")
            return shown.stdout

        return from_git
    raise SystemExit(f"{source}: neither a folder with '{CASES_FOLDER}/' nor a git directory")


def case_list(read: Callable[[str], bytes], name: str) -> List[str]:
    """The case IDs of ``train.list`` or ``test.list`` in their listed order."""
    lines = read(name).decode("utf-8").splitlines()
    return [line.strip().split("/")[0] for line in lines if line.strip()]


def to_image(array: np.ndarray, pixel_type: int) -> sitk.Image:
    """An (x, y, z) array as a SimpleITK image at the challenge's spacing."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image = sitk.Cast(image, pixel_type)
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def convert_case(read: Callable[[str], bytes], case: str, out: Path) -> None:
    import h5py

    with h5py.File(io.BytesIO(read(f"{CASES_FOLDER}/{case}/{H5_NAME}")), "r") as handle:
        image = np.asarray(handle["image"], dtype=np.float32)
        label = np.asarray(handle["label"])
    if image.ndim != 3 or image.shape != label.shape:
        raise SystemExit(f"{case}: image {image.shape} and label {label.shape} do not match")
    values = set(np.unique(label).tolist())
    if not values <= {0, 1}:
        raise SystemExit(f"{case}: label values {sorted(values)}, expected 0 and 1")
    sitk.WriteImage(to_image(image, sitk.sitkFloat32), str(out / "imagesTr" / f"{case}.nii.gz"))
    sitk.WriteImage(to_image(label, sitk.sitkUInt8), str(out / "labelsTr" / f"{case}.nii.gz"))


def convert(source: Path, out: Path) -> List[str]:
    """Write every listed case and the manifest; cases already written are kept."""
    read = source_reader(source)
    lists = {name: case_list(read, name) for name in LISTS}
    cases = lists["train.list"] + lists["test.list"]
    if len(set(cases)) != len(cases):
        raise SystemExit(f"{source}: a case is listed twice in {' and '.join(LISTS)}")
    for folder in ("imagesTr", "labelsTr"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for number, case in enumerate(cases, 1):
        if not (out / "labelsTr" / f"{case}.nii.gz").exists():
            convert_case(read, case, out)
        print(f"\r{number}/{len(cases)} {case}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for name, names in lists.items():
        (out / name).write_text("\n".join(names) + "\n", encoding="utf-8")
    manifest = {
        "name": "LeftAtrium2018",
        "description": "2018 Atrial Segmentation Challenge LGE-MRI, as cropped and z-scored by "
        "UA-MT; spacing 0.625 mm (not stored in the source files)",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": len(cases),
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases
        ],
    }
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="data folder or git directory")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder")
    args = parser.parse_args()
    cases = convert(args.source.expanduser(), args.out.expanduser())
    print(f"{len(cases)} cases in {args.out}")


if __name__ == "__main__":
    main()
