"""Results and their bookkeeping across rounds: review rows from ``scores.csv``, which files
belong to which case, which round each label came from, new label versions, retrain inputs.

Everything is kept in ``<output folder>/semisupseg-session.json`` next to the round folders
(``round-001/``, ``round-002/``...), so a session survives a Slicer restart. Plain Python.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from SemiSupSegLib.job_export import ClassTable
from SemiSupSegLib.output_layout import (
    MODEL_FILE,
    PREDICTIONS_FOLDER,
    RUN_FOLDER,
    SCORES_FILE,
    ScoreRow,
    read_table,
)
from SemiSupSegLib.protocol import JobSpec, LabeledCase, ProtocolError, UnlabeledCase

SESSION_FILE = "semisupseg-session.json"
LABELS_FOLDER = "labels"
SESSION_VERSION = 1

STATUS_TO_REVIEW = "to review"
STATUS_ACCEPTED = "accepted"


class ResultsError(ValueError):
    """Missing or malformed results; the message names the file."""


@dataclass
class ReviewRow:
    """One unlabeled case of a finished round, as the review table shows it."""

    case: str
    score: float
    foregroundVoxels: int
    label: str
    uncertainty: str
    image: str
    round: int
    status: str = STATUS_TO_REVIEW
    acceptedLabel: str = ""
    # every case score the prediction gave (``output_layout.CASE_SCORES``), by name
    caseScores: Dict[str, float] = field(default_factory=dict)

    def statusText(self) -> str:
        if self.status == STATUS_ACCEPTED:
            return f"accepted ({Path(self.acceptedLabel).name})"
        return self.status

    def cells(self) -> Tuple[str, str, str, str, str]:
        """The row as the review table shows it: case, score, foreground voxels, round,
        status."""
        values = (self.case, f"{self.score:.4f}", str(self.foregroundVoxels), str(self.round))
        return values + (self.statusText(),)


def readScores(path, roundNumber: int = 0) -> List[ReviewRow]:
    """Rows of a backend ``scores.csv`` (``output_layout.ScoreRow``), highest score first;
    relative paths are taken relative to the file's folder."""
    path = Path(path)
    try:
        scores = read_table(path, ScoreRow)
    except ProtocolError as err:
        raise ResultsError(str(err)) from None
    rows = [
        ReviewRow(
            case=score.case,
            score=score.score,
            foregroundVoxels=score.foreground_voxels,
            label=_absolute(score.label, path.parent),
            uncertainty=_absolute(score.uncertainty, path.parent),
            image=_absolute(score.image, path.parent),
            round=roundNumber,
            caseScores=score.case_scores(),
        )
        for score in scores
    ]
    rows.sort(key=lambda r: -r.score)
    return rows


def _absolute(text: str, base: Path) -> str:
    if not text:
        return ""
    path = Path(text)
    return str(path if path.is_absolute() else (base / path).resolve())


def reserveVersionPath(folder, case: str, suffix: str = ".nrrd") -> Path:
    """Create and return ``folder/<case>.v<N><suffix>`` with the first free N (>= 1).

    The empty file is created exclusively (``O_EXCL``), so two saves never pick the same name
    and an existing file is never overwritten.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = 1
    while True:
        path = folder / f"{case}.v{version}{suffix}"
        try:
            handle = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            version += 1
            continue
        os.close(handle)
        return path


@dataclass
class RoundRecord:
    round: int
    folder: str
    status: str = "exported"
    initFrom: Optional[str] = None
    labeled: List[str] = field(default_factory=list)
    unlabeled: List[Dict[str, str]] = field(default_factory=list)
    outputs: Dict[str, str] = field(default_factory=dict)
    # seconds each part of the round took (``Workflow``): export, start-up, checks, training,
    # prediction, import
    times: Dict[str, float] = field(default_factory=dict)


@dataclass
class AcceptedCase:
    case: str
    image: str
    label: str
    round: int
    version: int


class Session:
    """The rounds of one output folder and the cases accepted into the labeled set."""

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        self.classes: Optional[ClassTable] = None
        self.rounds: List[RoundRecord] = []
        self.accepted: Dict[str, AcceptedCase] = {}

    # --------------------------------------------------------------- persistence

    @property
    def path(self) -> Path:
        return self.folder / SESSION_FILE

    @classmethod
    def load(cls, folder) -> "Session":
        """The session stored in ``folder``, or a new empty one."""
        session = cls(folder)
        if not session.path.exists():
            return session
        try:
            data = json.loads(session.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResultsError(f"{session.path}: cannot read the session ({err})") from None
        if data.get("version") != SESSION_VERSION:
            raise ResultsError(f"{session.path}: unknown session version {data.get('version')!r}")
        if data.get("classes"):
            session.classes = ClassTable.fromDict(data["classes"])
        session.rounds = [RoundRecord(**r) for r in data.get("rounds", [])]
        session.accepted = {
            name: AcceptedCase(**entry) for name, entry in (data.get("accepted") or {}).items()
        }
        return session

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "version": SESSION_VERSION,
            "classes": self.classes.toDict() if self.classes else None,
            "rounds": [asdict(r) for r in self.rounds],
            "accepted": {name: asdict(a) for name, a in self.accepted.items()},
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(self.path)

    # -------------------------------------------------------------------- rounds

    def newRound(self) -> Tuple[int, Path]:
        """The next round number and its (new, empty) folder."""
        number = max([r.round for r in self.rounds] + [0]) + 1
        while (self.folder / f"round-{number:03d}").exists():
            number += 1
        folder = self.folder / f"round-{number:03d}"
        folder.mkdir(parents=True)
        return number, folder

    def recordRound(self, number: int, jobDir, job: JobSpec, classes: ClassTable) -> RoundRecord:
        jobDir = Path(jobDir)
        resolved = job.resolve(jobDir)
        record = RoundRecord(
            round=number,
            folder=jobDir.name if jobDir.parent == self.folder else str(jobDir),
            initFrom=job.init_from,
            labeled=[c.name for c in job.labeled],
            unlabeled=[{"name": c.name, "image": c.image} for c in resolved.unlabeled],
        )
        self.rounds = [r for r in self.rounds if r.round != number] + [record]
        self.rounds.sort(key=lambda r: r.round)
        self.classes = classes
        self.save()
        return record

    def finishRound(
        self,
        number: int,
        status: str,
        outputs: Optional[Dict[str, str]] = None,
        times: Optional[Dict[str, float]] = None,
    ):
        record = self.round(number)
        record.status = status
        record.outputs = dict(outputs or {})
        record.times.update(times or {})
        self.save()
        return record

    def recordTimes(self, number: int, times: Dict[str, float]) -> RoundRecord:
        """Add ``times`` (seconds by part) to round ``number``'s record."""
        record = self.round(number)
        record.times.update(times)
        self.save()
        return record

    def round(self, number: int) -> RoundRecord:
        for record in self.rounds:
            if record.round == number:
                return record
        raise ResultsError(f"{self.path}: no round {number}")

    def roundFolder(self, number: int) -> Path:
        folder = Path(self.round(number).folder)
        return folder if folder.is_absolute() else self.folder / folder

    def lastFinishedRound(self) -> Optional[RoundRecord]:
        finished = [r for r in self.rounds if r.status == "finished"]
        return finished[-1] if finished else None

    def modelOf(self, number: int) -> Path:
        return self.roundFolder(number) / RUN_FOLDER / MODEL_FILE

    def scoresOf(self, number: int) -> Path:
        return self.roundFolder(number) / PREDICTIONS_FOLDER / SCORES_FILE

    # -------------------------------------------------------------------- review

    def reviewRows(self, number: Optional[int] = None) -> List[ReviewRow]:
        """The review table of a round (default: the last finished one), with accept status."""
        if number is None:
            record = self.lastFinishedRound()
            if record is None:
                return []
            number = record.round
        scores = self.scoresOf(number)
        if not scores.exists():
            return []
        rows = readScores(scores, number)
        for row in rows:
            accepted = self.accepted.get(row.case)
            if accepted is not None:
                row.status = STATUS_ACCEPTED
                row.acceptedLabel = accepted.label
        return rows

    def reserveLabelVersion(self, case: str, suffix: str = ".nrrd") -> Path:
        return reserveVersionPath(self.folder / LABELS_FOLDER, case, suffix)

    def accept(self, case: str, image: str, labelPath, roundNumber: int) -> AcceptedCase:
        """Record that ``labelPath`` (a new file version) is now the label of ``case``."""
        labelPath = Path(labelPath)
        version = _versionOf(labelPath)
        entry = AcceptedCase(case, str(image), str(labelPath), int(roundNumber), version)
        self.accepted[case] = entry
        self.save()
        return entry

    def labelOrigin(self, case: str) -> str:
        """Where a labeled case's label came from: drawn by the user, or accepted in round k."""
        entry = self.accepted.get(case)
        if entry is None:
            return "user"
        return f"round {entry.round} (v{entry.version})"

    def retrainInputs(self) -> Tuple[List[LabeledCase], List[UnlabeledCase], Optional[str]]:
        """Accepted cases as labeled, the last round's other unlabeled cases, its model."""
        last = self.lastFinishedRound()
        if last is None:
            raise ResultsError("no finished round yet: run a first job before retraining")
        labeled = [
            LabeledCase(a.case, a.image, a.label)
            for a in sorted(self.accepted.values(), key=lambda a: a.case)
        ]
        unlabeled = [
            UnlabeledCase(entry["name"], entry["image"])
            for entry in last.unlabeled
            if entry["name"] not in self.accepted
        ]
        model = self.modelOf(last.round)
        if not model.exists():
            raise ResultsError(f"{model}: the last round's model is missing")
        return labeled, unlabeled, str(model)


def _versionOf(path: Path) -> int:
    stem = path.name.split(".v")[-1].split(".")[0]
    try:
        return int(stem)
    except ValueError:
        return 0


def rowsAsTable(rows: List[ReviewRow]) -> List[Dict[str, Any]]:
    """Rows as plain dicts (for printing in the Python console)."""
    return [asdict(r) for r in rows]
