"""Dataset sources: which image and label files make up a training set.

Three layouts load without extra input: a Medical Segmentation Decathlon ``dataset.json``, an
nnU-Net v2 raw folder and a plain folder with ``imagesTr/`` and ``labelsTr/``. Loading only lists
files (and checks they exist); reading and checking voxels is ``validation``'s job, so that
loading a large dataset stays instant.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.protocol import CHANNEL_SUFFIX, IMAGE_SUFFIXES, case_name_from_path

PathLike = Union[str, Path]

MANIFEST_NAME = "dataset.json"
_UNLABELED_FOLDERS = ("imagesUnlabeled", "imagesTs")
_IGNORED_FOLDERS = ("__MACOSX",)


@dataclass
class Case:
    """One volume: an image file (or DICOM series folder) and, if labeled, its label map."""

    name: str
    image: Path
    label: Optional[Path] = None


@dataclass
class Dataset:
    """Labeled and unlabeled cases plus the label classes (value -> name, 0 = background).

    ``classes`` is None for a plain folder without a manifest until ``infer_classes`` fills it.
    ``modality`` is "MR", "CT" or "other"; ``source`` is the file or folder it was loaded from.
    """

    labeled: List[Case]
    unlabeled: List[Case] = field(default_factory=list)
    classes: Optional[Dict[int, str]] = None
    modality: str = "MR"
    source: Optional[Path] = None

    def all_cases(self) -> List[Case]:
        """Labeled cases first, then unlabeled ones."""
        return list(self.labeled) + list(self.unlabeled)


# ---------------------------------------------------------------- loading


def load_dataset(path: PathLike) -> Dataset:
    """Load an MSD ``dataset.json`` (or its folder), an nnU-Net v2 raw folder or a plain folder.

    A plain folder needs ``imagesTr/`` and ``labelsTr/``; ``imagesUnlabeled/`` and ``imagesTs/``
    add unlabeled cases. Its classes stay None (see ``infer_classes``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "dataset file or folder does not exist")
    if path.is_file():
        return _load_manifest(path)
    if not is_dataset_folder(path):
        raise DataError(
            path,
            f"not a dataset: expected a {MANIFEST_NAME} (Decathlon or nnU-Net) "
            "or an imagesTr/ folder with a labelsTr/ folder next to it",
        )
    if (path / MANIFEST_NAME).is_file():
        return _load_manifest(path / MANIFEST_NAME)
    dataset = from_folders(
        path / "imagesTr",
        _required_folder(path / "labelsTr"),
        unlabeled=[path / name for name in _UNLABELED_FOLDERS if (path / name).is_dir()],
    )
    return replace(dataset, source=path)


def is_dataset_folder(path: Path) -> bool:
    """Whether ``load_dataset`` reads the folder ``path`` as a dataset: it holds a
    ``dataset.json`` or an ``imagesTr/`` folder."""
    return (path / MANIFEST_NAME).is_file() or (path / "imagesTr").is_dir()


def _load_manifest(path: Path) -> Dataset:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read the file ({error})") from None
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise DataError(path, "expected a JSON object with the dataset's description")
    if "channel_names" in manifest:
        return _load_nnunet(path, manifest)
    if "training" in manifest:
        return _load_decathlon(path, manifest)
    raise DataError(
        path,
        'neither a Decathlon manifest (no "training" list) nor an nnU-Net v2 one '
        '(no "channel_names")',
    )


def _load_decathlon(path: Path, manifest: Dict[str, Any]) -> Dataset:
    """MSD layout: "training" [{image, label}], "labels" {"0": name}, "modality" {"0": name}.

    Not ``monai.data.load_decathlon_datalist``: it reads the file again (in the locale's
    encoding), fails on an empty "test" list (IndexError), takes "unlabeled" image paths only as
    {"image": ...} objects, raises TypeError without naming the entry, and checks neither that
    an entry has its paths nor that the files exist; what it would replace is two path joins.
    """
    root = path.parent
    modality = _single_channel(path, manifest.get("modality", {"0": "MRI"}), "modality")
    classes = _classes_from_mapping(path, manifest.get("labels"), values_are_names=True)
    training = manifest["training"]
    if not isinstance(training, list):
        raise DataError(path, '"training" must be a list of {"image": ..., "label": ...}')
    labeled = []
    for number, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(path, f'"training" entry {number} needs "image" and "label" paths')
        image = _listed_file(path, root, entry["image"])
        labeled.append(
            Case(case_name_from_path(str(image)), image, _listed_file(path, root, entry["label"]))
        )
    unlabeled = []
    for key in ("test", "unlabeled"):
        entries = manifest.get(key) or []
        if not isinstance(entries, list):
            raise DataError(path, f'"{key}" must be a list of image paths')
        for entry in entries:
            relative = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(relative, str):
                raise DataError(path, f'"{key}" entries must be image paths, found {entry!r}')
            image = _listed_file(path, root, relative)
            unlabeled.append(Case(case_name_from_path(str(image)), image))
    return Dataset(labeled, unlabeled, classes, _modality_of(modality), source=path)


def _load_nnunet(path: Path, manifest: Dict[str, Any]) -> Dataset:
    """nnU-Net v2 raw layout: imagesTr/CASE_0000.ext, labelsTr/CASE.ext, optional imagesTs/."""
    root = path.parent
    channel = _single_channel(path, manifest["channel_names"], "channel_names")
    classes = _classes_from_mapping(path, manifest.get("labels"), values_are_names=False)
    ending = manifest.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(
            path,
            f'"file_ending" {ending!r} is not supported; use one of {", ".join(IMAGE_SUFFIXES)}',
        )
    images = _required_folder(root / "imagesTr")
    for image in images.iterdir():
        stem = image.name[: -len(ending)] if image.name.endswith(ending) else ""
        if stem[-5:-4] == "_" and stem[-4:].isdigit() and stem[-5:] != CHANNEL_SUFFIX:
            raise DataError(
                image, "a second image channel; only single-channel datasets are supported"
            )
    test_images = root / "imagesTs"
    dataset = _pair_folders(
        images,
        _required_folder(root / "labelsTr"),
        test_images if test_images.is_dir() else None,
        classes,
        allow_unlabeled=False,
        ending=ending,
    )
    expected = manifest.get("numTraining")
    if isinstance(expected, int) and expected != len(dataset.labeled):
        raise DataError(
            path,
            f'"numTraining" says {expected} cases but imagesTr/ and labelsTr/ hold '
            f"{len(dataset.labeled)}",
        )
    return replace(dataset, modality=_modality_of(channel), source=path)


def _single_channel(path: Path, channels: Any, key: str) -> str:
    if not isinstance(channels, dict) or not channels:
        raise DataError(path, f'"{key}" must map channel numbers to names, e.g. {{"0": "MRI"}}')
    if len(channels) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in channels.items())
        raise DataError(
            path,
            f"the dataset has {len(channels)} image channels ({listed}); "
            "only single-channel images are supported",
        )
    return str(next(iter(channels.values())))


def _modality_of(name: str) -> str:
    """Map a manifest's modality or channel name to "MR", "CT" or "other"."""
    upper = name.strip().upper()
    if upper in ("CT", "CBCT") or upper.startswith("CT"):
        return "CT"
    mr_names = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "T1W", "T2W")
    if upper in mr_names or upper.startswith(("MR", "T1", "T2")):
        return "MR"
    return "other"


def _classes_from_mapping(path: Path, labels: Any, values_are_names: bool) -> Dict[int, str]:
    """Classes from MSD's {"1": "name"} or nnU-Net's {"name": 1}; 0 is always background."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, '"labels" must map label values to class names')
    classes: Dict[int, str] = {}
    for key, value in labels.items():
        text, name = (key, value) if values_are_names else (value, key)
        if not values_are_names and isinstance(value, list):
            raise DataError(
                path,
                f'label "{key}" is a region (list of values); region-based labels are not supported',
            )
        try:
            number = int(text)
        except (TypeError, ValueError):
            raise DataError(path, f'label value {text!r} in "labels" is not an integer') from None
        if number < 0 or str(number) != str(text).strip():
            raise DataError(path, f'label value {text!r} in "labels" is not a whole number >= 0')
        if number in classes:
            raise DataError(path, f'label value {number} appears twice in "labels"')
        classes[number] = str(name)
    classes.setdefault(0, "background")
    return dict(sorted(classes.items()))


def _listed_file(manifest: Path, root: Path, relative: Any) -> Path:
    if not isinstance(relative, str) or not relative:
        raise DataError(manifest, f"expected a file path, found {relative!r}")
    file = root / relative
    if not file.exists():
        raise DataError(file, f"listed in {manifest} but does not exist")
    return file


def _required_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise DataError(folder, "folder is missing")
    return folder


# ---------------------------------------------------------------- folders


def from_folders(
    images: PathLike,
    labels: PathLike,
    unlabeled: Union[PathLike, Iterable[PathLike], None] = None,
    classes: Optional[Dict[int, str]] = None,
    allow_unlabeled: bool = False,
) -> Dataset:
    """Pair the images in ``images`` with the label maps in ``labels`` by case name.

    Case names are file names without their extension and without nnU-Net's ``_0000``; a
    sub-folder (a DICOM series) is a case named after the folder. An image without a label is an
    error unless ``allow_unlabeled`` (then it is unlabeled); a label without an image is an error.
    ``unlabeled`` is one or more folders of images without labels.
    """
    return _pair_folders(images, labels, unlabeled, classes, allow_unlabeled, ending=None)


def _pair_folders(
    images: PathLike,
    labels: PathLike,
    unlabeled: Union[PathLike, Iterable[PathLike], None],
    classes: Optional[Dict[int, str]],
    allow_unlabeled: bool,
    ending: Optional[str],
) -> Dataset:
    """``from_folders``, optionally taking only files that end in ``ending`` (nnU-Net)."""
    images, labels = Path(images), Path(labels)
    image_files = files_by_case(_required_folder(images), ending, folders_too=True)
    label_files = files_by_case(_required_folder(labels), ending, folders_too=False)
    if not image_files:
        raise DataError(images, "folder holds no images (.nii.gz, .nii, .nrrd, .mha, .mhd, DICOM)")
    for name, label in label_files.items():
        if name not in image_files:
            raise DataError(label, f"label has no matching image in {images}")
    labeled, unlabeled_cases = [], []
    for name, image in image_files.items():
        if name in label_files:
            labeled.append(Case(name, image, label_files[name]))
        elif allow_unlabeled:
            unlabeled_cases.append(Case(name, image))
        else:
            raise DataError(
                image, f"image has no label in {labels} (expected a file named {name}.*)"
            )
    if unlabeled is None:
        folders: List[Path] = []
    elif isinstance(unlabeled, (str, Path)):
        folders = [Path(unlabeled)]
    else:
        folders = [Path(folder) for folder in unlabeled]
    for folder in folders:
        found = files_by_case(_required_folder(folder), ending, folders_too=True)
        unlabeled_cases.extend(Case(name, image) for name, image in found.items())
    return Dataset(labeled, unlabeled_cases, classes)


def cases_from_paths(paths: Sequence[Path]) -> List[Case]:
    """Cases (images only) from image files, folders of images or series, and DICOM series
    folders, named as training names them (extension and nnU-Net's ``_0000`` removed)."""
    cases: List[Case] = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            cases.append(Case(case_name_from_path(str(path)), path))
        elif path.is_dir():
            found = files_by_case(path, None, folders_too=True)
            if not found:  # the folder itself is one DICOM series
                found = {path.name: path}
            cases.extend(Case(name, entry) for name, entry in found.items())
        else:
            raise DataError(path, "no such file or folder")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(None, f"duplicate case names in the inputs: {duplicates}")
    return cases


def files_by_case(
    folder: Path, ending: Optional[str] = None, folders_too: bool = False
) -> Dict[str, Path]:
    """Image files directly in ``folder`` by case name (``case_name_from_path``), sorted by name.

    Hidden entries are skipped, and so are files that do not end in ``ending`` (default: any
    image ending) and sub-folders unless ``folders_too`` (then each is a DICOM series case).
    Raises DataError naming the file when two entries give the same case name.
    """
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in _IGNORED_FOLDERS:
            continue
        if entry.is_dir():
            if not folders_too:
                continue
        elif ending is not None:
            if not entry.name.endswith(ending):
                continue
        elif not entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue  # e.g. the .raw data file of a .mhd header, notes, thumbnails
        name = case_name_from_path(str(entry))
        if name in found:
            raise DataError(entry, f"two files give the case name {name!r}: {found[name].name} too")
        found[name] = entry
    return found


def label_maps(path: PathLike) -> Tuple[Dict[str, Path], Optional[Dict[int, str]]]:
    """Label maps by case name, and their classes: what ``evaluate`` scores predictions against.

    ``path`` is a dataset that ``load_dataset`` reads (its labeled cases, named as training
    names them; classes from its manifest, None for a plain folder) or a folder of label map
    files named by case (classes None). Raises DataError naming the file or folder.
    """
    path = Path(path)
    if path.is_dir() and not is_dataset_folder(path):
        files = files_by_case(path)
        if not files:
            raise DataError(
                path,
                f"no label files ({', '.join(IMAGE_SUFFIXES)}) in the folder, and not a dataset",
            )
        return files, None
    dataset = load_dataset(path)
    return {case.name: case.label for case in dataset.labeled if case.label}, dataset.classes


def infer_classes(dataset: Dataset) -> Dict[int, str]:
    """Classes 0..N named "background", "class_1", ... with N the largest value in any label.

    Reads every label map, so it is as slow as validation; meant for plain folders. The values
    found must run 0..N without gaps (nnU-Net's rule): a value beyond a gap (7 among 0..2) is a
    DataError naming a file that holds it, since it would add empty classes.
    """
    from SemiSupSegLib.backend.validation import validate_label  # imports this module

    found: Dict[int, Path] = {}
    for case in dataset.labeled:
        if case.label is None:
            continue
        _, values = validate_label(case.label, None)
        for value in values:
            found.setdefault(value, case.label)
    largest = max(found, default=0)
    missing = sorted(set(range(largest + 1)) - set(found) - {0})
    if missing:
        raise DataError(
            found[largest],
            f"label value {largest} leaves a gap: no label map holds "
            f"{', '.join(str(v) for v in missing[:5])}{' ...' if len(missing) > 5 else ''}; "
            "label values must run 0..N without gaps (an absent value would be trained as an "
            "empty class): renumber the label maps",
        )
    classes = {0: "background"}
    classes.update({value: f"class_{value}" for value in range(1, largest + 1)})
    return classes


# ---------------------------------------------------------------- subsets


def with_labeled_subset(dataset: Dataset, names: Iterable[str]) -> Dataset:
    """Keep labels only for ``names``; other labeled cases become unlabeled (label dropped)."""
    wanted = _known_names(dataset, names)
    labeled_names = {case.name for case in dataset.labeled}
    without_label = sorted(wanted - labeled_names)
    if without_label:
        raise DataError(
            dataset.source, f"these cases have no label to keep: {', '.join(without_label)}"
        )
    keep = [case for case in dataset.labeled if case.name in wanted]
    demoted = [Case(case.name, case.image) for case in dataset.labeled if case.name not in wanted]
    return replace(dataset, labeled=keep, unlabeled=demoted + list(dataset.unlabeled))


def exclude_cases(dataset: Dataset, names: Iterable[str]) -> Dataset:
    """Remove ``names`` from the dataset entirely (e.g. cases held out for testing)."""
    drop = _known_names(dataset, names)
    return replace(
        dataset,
        labeled=[case for case in dataset.labeled if case.name not in drop],
        unlabeled=[case for case in dataset.unlabeled if case.name not in drop],
    )


def _known_names(dataset: Dataset, names: Iterable[str]) -> Set[str]:
    """``names`` as a set; an unknown name is a DataError that suggests close ones."""
    if isinstance(names, str):
        names = [names]
    wanted = set(names)
    known = [case.name for case in dataset.all_cases()]
    unknown = sorted(wanted - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hints.append(f"{name} (did you mean {', '.join(close)}?)" if close else name)
        raise DataError(dataset.source, f"unknown case names: {'; '.join(hints)}")
    return wanted


def read_case_list(path: PathLike) -> List[str]:
    """Case names from a text file, one per line; blank lines and ``#`` comments are skipped.

    File names or paths are accepted too ("imagesTr/case_01.nii.gz" gives "case_01").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "case list file does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read the case list ({error})") from None
    names: List[str] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            name = case_name_from_path(entry)
            if name not in names:
                names.append(name)
    return names
