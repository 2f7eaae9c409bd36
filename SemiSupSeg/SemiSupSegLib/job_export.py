"""Scene -> job folder (protocol v1): labeled pairs, unlabeled volumes, classes, settings.

Classes are defined by segment names: the first labeled case's segment order gives label
values 1..N, every other case must have the same names (a clear error names the case that
differs), and each segmentation is exported with its segment IDs passed in that order, so a
name always gets the same value. A labeled pair may also use a labelmap volume; its colour
table's names play the role of segment names. Labels are always written in their volume's own
grid, whatever grid they were drawn on and whatever transforms either node is under.

Job folder layout (``jobDir``): ``job.json``, ``inputs/images/<case>.nrrd``,
``inputs/labels/<case>.nrrd``, ``inputs/unlabeled/<case>.nrrd``; the backend writes its outputs
next to them (``run/``, ``predictions/``). Unlabeled images from a folder on disk are referenced
where they are, never copied or loaded into the scene. Job inputs are written uncompressed: the
backend reads them once, and gzip would be most of the time the user waits for an export.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from SemiSupSegLib import mrml_io
from SemiSupSegLib.protocol import (
    IMAGE_SUFFIXES,
    JOB_FILE_NAME,
    JobSpec,
    LabeledCase,
    UnlabeledCase,
    case_name_from_path,
)
from SemiSupSegLib.training_options import TrainingOptions

Colour = Tuple[float, float, float]
EXPORT_SUFFIX = ".nrrd"
# Called before each file is written and once at the end: (files done, files in all, what).
ExportProgress = Callable[[int, int, str], None]


class ClassMismatchError(ValueError):
    """The labeled cases do not define the same classes; the message names the case."""


class ExportError(ValueError):
    """Inputs that cannot be turned into a job; the message says which and why."""


class ExportCancelled(Exception):
    """The user stopped an export (raised from an ``ExportProgress`` callback)."""


@dataclass
class ClassTable:
    """Class names in label-value order (value = index + 1) and their display colours."""

    names: List[str]
    colours: Dict[str, Colour] = field(default_factory=dict)

    def jobClasses(self) -> Dict[str, str]:
        classes = {"0": "background"}
        classes.update({str(i + 1): name for i, name in enumerate(self.names)})
        return classes

    def toDict(self) -> Dict[str, Any]:
        return {"names": list(self.names), "colours": {k: list(v) for k, v in self.colours.items()}}

    @classmethod
    def fromDict(cls, data: Dict[str, Any]) -> "ClassTable":
        return cls(
            names=list(data.get("names", [])),
            colours={k: tuple(v) for k, v in (data.get("colours") or {}).items()},
        )


def checkClassNames(cases: Sequence[Tuple[str, Sequence[str]]]) -> List[str]:
    """The class names shared by every case, in the first case's order.

    ``cases`` holds (case name, segment names). Raises ClassMismatchError naming the first case
    whose names differ from the first case's, with what is missing and what is extra.
    """
    if not cases:
        raise ExportError("no labeled cases: add at least one volume with its segmentation")
    reference: Optional[List[str]] = None
    referenceCase = ""
    for caseName, names in cases:
        names = [str(n) for n in names]
        if not names:
            raise ClassMismatchError(
                f"labeled case '{caseName}' has no segments: each labeled case needs "
                "one segment per class"
            )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ClassMismatchError(
                f"labeled case '{caseName}' has several segments named {duplicates}: "
                "segment names define the classes and must be unique"
            )
        if reference is None:
            reference, referenceCase = names, caseName
            continue
        missing = [n for n in reference if n not in names]
        extra = [n for n in names if n not in reference]
        if missing or extra:
            details = []
            if missing:
                details.append(f"it lacks {missing}")
            if extra:
                details.append(f"it has {extra} in addition")
            raise ClassMismatchError(
                f"labeled case '{caseName}' has different segment names than "
                f"'{referenceCase}' ({'; '.join(details)}). Segment names define the classes: "
                f"rename the segments so that every labeled case has {reference}."
            )
    return list(reference or [])


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitizeCaseName(text: str) -> str:
    """A file-safe case name: letters, digits, '.', '_' and '-' only."""
    name = _UNSAFE.sub("_", str(text).strip()).strip("._")
    return name or "case"


def uniqueName(base: str, taken: set) -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is not in ``taken`` (then added)."""
    name, index = base, 2
    while name.lower() in {t.lower() for t in taken}:
        name = f"{base}_{index}"
        index += 1
    taken.add(name)
    return name


def imagesInFolder(folder) -> List[Path]:
    """Image files (by extension) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"unlabeled folder {folder}: no such folder")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


@dataclass
class LabeledPair:
    """A labeled case in the scene: a volume and its segmentation (or labelmap volume)."""

    volume: Any
    labels: Any
    name: Optional[str] = None


class JobExporter:
    """Writes a job folder from scene nodes and files; the scene is left as it was."""

    def __init__(self, scene, jobDir) -> None:
        self.scene = scene
        self.jobDir = Path(jobDir)
        self.exportedNodes: Dict[str, Any] = {}  # case name -> the scene volume it came from

    # ------------------------------------------------------------------ classes

    @staticmethod
    def classNamesOf(labels) -> List[str]:
        if mrml_io.isSegmentation(labels):
            return mrml_io.segmentNames(labels)
        if mrml_io.isLabelmap(labels):
            return [name for _, name in sorted(mrml_io.labelmapClasses(labels).items())]
        raise ExportError(
            f"{_name(labels)}: expected a segmentation or a labelmap volume for the labels"
        )

    @staticmethod
    def coloursOf(labels) -> Dict[str, Colour]:
        if mrml_io.isSegmentation(labels):
            return mrml_io.segmentColours(labels)
        return mrml_io.labelmapColours(labels)

    def collectClasses(self, pairs: Sequence[LabeledPair]) -> ClassTable:
        cases = []
        for index, pair in enumerate(pairs):
            if pair.volume is None or pair.labels is None:
                raise ExportError(
                    f"labeled case {index + 1}: pick both a volume and its segmentation"
                )
            cases.append((pair.name or _name(pair.labels), self.classNamesOf(pair.labels)))
        names = checkClassNames(cases)
        colours: Dict[str, Colour] = {}
        for pair in pairs:
            for name, colour in self.coloursOf(pair.labels).items():
                colours.setdefault(name, colour)
        return ClassTable(names, colours)

    # ------------------------------------------------------------------- export

    def export(
        self,
        pairs: Sequence[LabeledPair],
        unlabeledVolumes: Sequence[Any] = (),
        unlabeledFolder: Optional[str] = None,
        options: Optional[TrainingOptions] = None,
        initFrom: Optional[str] = None,
        extraLabeled: Sequence[LabeledCase] = (),
        extraUnlabeled: Sequence[UnlabeledCase] = (),
        classes: Optional[ClassTable] = None,
        progress: Optional[ExportProgress] = None,
    ) -> Tuple[JobSpec, ClassTable]:
        """Export everything and write ``job.json``; returns the job and its class table.

        ``extraLabeled``/``extraUnlabeled`` are cases already on disk (absolute paths), e.g.
        cases accepted in an earlier round. ``classes`` fixes the class order (retraining).
        ``progress`` is told about each file before it is written; it may raise
        ``ExportCancelled`` to stop.
        """
        options = (options or TrainingOptions()).validate()
        if not pairs and not extraLabeled:
            raise ExportError("no labeled cases: add at least one volume with its segmentation")
        table = self.collectClasses(pairs) if pairs else None
        if classes is not None:
            if table is not None and sorted(table.names) != sorted(classes.names):
                raise ClassMismatchError(
                    f"the labeled cases have segments {table.names}, but earlier rounds used "
                    f"{classes.names}; segment names must stay the same across rounds"
                )
            colours = dict(classes.colours)
            if table is not None:
                for name, colour in table.colours.items():
                    colours.setdefault(name, colour)
            table = ClassTable(list(classes.names), colours)
        if table is None:
            raise ExportError("no class names: give the class table of the earlier round")

        self.jobDir.mkdir(parents=True, exist_ok=True)
        labeledVolumes = {id(p.volume) for p in pairs}
        unlabeledNodes = [
            n for n in unlabeledVolumes if n is not None and id(n) not in labeledVolumes
        ]
        step = _Steps(2 * len(pairs) + len(unlabeledNodes), progress)
        taken: set = {c.name for c in extraLabeled} | {c.name for c in extraUnlabeled}
        labeled: List[LabeledCase] = []
        for pair in pairs:
            case = uniqueName(sanitizeCaseName(pair.name or _name(pair.volume)), taken)
            image = self._relative(self.jobDir / "inputs" / "images" / (case + EXPORT_SUFFIX))
            label = self._relative(self.jobDir / "inputs" / "labels" / (case + EXPORT_SUFFIX))
            step(f"image of {case}")
            mrml_io.writeVolumeNode(pair.volume, self.jobDir / image, compress=False)
            step(f"labels of {case}")
            self._exportLabels(pair, table.names, self.jobDir / label)
            labeled.append(LabeledCase(case, image, label))
            self.exportedNodes[case] = pair.volume
        labeled.extend(extraLabeled)

        unlabeled: List[UnlabeledCase] = list(extraUnlabeled)
        for node in unlabeledNodes:
            case = uniqueName(sanitizeCaseName(_name(node)), taken)
            image = self._relative(self.jobDir / "inputs" / "unlabeled" / (case + EXPORT_SUFFIX))
            step(f"unlabeled {case}")
            mrml_io.writeVolumeNode(node, self.jobDir / image, compress=False)
            unlabeled.append(UnlabeledCase(case, image))
            self.exportedNodes[case] = node
        step("job.json")
        if unlabeledFolder:
            for path in imagesInFolder(unlabeledFolder):
                case = uniqueName(sanitizeCaseName(case_name_from_path(str(path))), taken)
                unlabeled.append(UnlabeledCase(case, str(path.resolve())))

        job = JobSpec(
            labeled=labeled,
            unlabeled=unlabeled,
            classes=table.jobClasses(),
            method=options.method,
            device=options.device,
            modality=options.modality,
            output=".",
            settings=options.settings(),
            budget=options.budget,
            predict_unlabeled=True,
            init_from=str(initFrom) if initFrom else None,
        )
        JobSpec.from_dict(job.to_dict())  # the same checks the backend makes, before it starts
        job.save(self.jobDir / JOB_FILE_NAME)
        return job, table

    def _exportLabels(self, pair: LabeledPair, classNames: Sequence[str], path: Path) -> None:
        if mrml_io.isSegmentation(pair.labels):
            mrml_io.exportSegmentsToFile(
                self.scene, pair.labels, classNames, pair.volume, path, compress=False
            )
            return
        byName = {name: value for value, name in mrml_io.labelmapClasses(pair.labels).items()}
        valueToClass = {byName[name]: i + 1 for i, name in enumerate(classNames) if name in byName}
        mrml_io.exportLabelmapToFile(
            self.scene, pair.labels, valueToClass, classNames, pair.volume, path, compress=False
        )

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.jobDir).as_posix()


class _Steps:
    """Counts the files of an export for an ``ExportProgress`` callback."""

    def __init__(self, files: int, progress: Optional[ExportProgress]) -> None:
        self.done, self.total, self.progress = 0, files, progress

    def __call__(self, what: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.done += 1


def _name(node) -> str:
    if node is None:
        return "(none)"
    return node.GetName() or node.GetID() or "case"
