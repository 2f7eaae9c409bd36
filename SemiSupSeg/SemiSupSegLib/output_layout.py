"""The backend's outputs: folder and file names, and the columns of its tables, stated once.

Part of the job protocol (``protocol``): the backend writes by these names and the Slicer
module, the scripts and the tests read by them. Standard library only, Python 3.9.

A job's output folder (``JobSpec.output``; the demo's and the benchmark's work folders)::

    run/                         train: the run folder
        model.pt                 the finished model
        checkpoint.pt            the latest checkpoint (resume, warm start)
        config.json              the settings trained with
        plan.json                the plan made from the data and the device (planned runs)
        cases.json               the cases and classes trained on
    predictions/                 predict: a prediction folder
        <case>.<ext>             the label map (of a job's unlabeled case: its pseudo-mask)
        uncertainty/<case>.<ext> the voxel-wise uncertainty map
        scores.csv               one ScoreRow per case, review order (REVIEW_SCORE) first
        predictions.json         the manifest: model, time, cases, complete or partial
    evaluation/                  evaluate (demo, benchmark)
        metrics.csv              one MetricsRow per case and class
        summary.json             statistics per class
"""

import csv
import io
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar, Iterable, List, Optional, Type, TypeVar, Union

from SemiSupSegLib.protocol import IMAGE_SUFFIXES, ProtocolError

RUN_FOLDER = "run"
PREDICTIONS_FOLDER = "predictions"
EVALUATION_FOLDER = "evaluation"

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
CASES_FILE = "cases.json"

UNCERTAINTY_FOLDER = "uncertainty"
SCORES_FILE = "scores.csv"
PREDICTION_MANIFEST_FILE = "predictions.json"

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"

# ``semisupseg compare``: OUT/<method>/{run,predictions,evaluation}/ beside these two.
COMPARISON_FILE = "comparison.json"
HELD_OUT_FILE = "held-out.json"

#: A prediction is one file: header + data inputs give their single-file form.
_SINGLE_FILE_SUFFIX = {".nhdr": ".nrrd", ".mhd": ".mha"}
#: The ending of a prediction from a DICOM series folder.
SERIES_PREDICTION_SUFFIX = ".nii.gz"


def label_file_name(case: str, image: str) -> str:
    """The file name of ``case``'s predicted label map (pseudo-mask) in a prediction folder:
    the case name with its input's ending (``.nhdr`` gives ``.nrrd``, ``.mhd`` gives ``.mha``,
    a DICOM series folder ``.nii.gz``). The uncertainty map has the same name in
    ``uncertainty/``."""
    source = str(image).lower()
    for suffix in IMAGE_SUFFIXES:
        if source.endswith(suffix):
            return case + _SINGLE_FILE_SUFFIX.get(suffix, suffix)
    return case + SERIES_PREDICTION_SUFFIX


def uncertainty_file_name(label_file: str) -> str:
    """The uncertainty map of the label map ``label_file``, relative to the prediction folder
    in ``/`` notation (as ``predictions.json`` lists it)."""
    return f"{UNCERTAINTY_FOLDER}/{label_file}"


# ---------------------------------------------------------------- tables


#: The case scores ``predict`` computes (columns of ``scores.csv``; ``backend.case_scores``
#: says how), each higher for a case to review sooner:
#: ``boundary_uncertainty`` the mean uncertainty near the predicted boundary; ``disagreement``
#: between the deployed model and the method's other trained model (M&N's 2D model);
#: ``mutual_information`` of Monte Carlo dropout passes (BALD); ``expected_changed_share`` of
#: the predicted structure a correction is expected to change.
CASE_SCORES = (
    "boundary_uncertainty",
    "disagreement",
    "mutual_information",
    "expected_changed_share",
)
#: The score the review order follows: ``scores.csv``'s ``score`` column copies it (or
#: ``boundary_uncertainty``, which every prediction has, where a model cannot give it), and
#: the panel sorts by ``score``. Switching the order the product ships is this one line.
REVIEW_SCORE = "boundary_uncertainty"


def review_order() -> str:
    """The review table's order in words, for captions: the review score, highest first. It
    names the sort and nothing more: no score met the review-order target (1.5 times the gain
    of correcting random cases) on both benchmarks (``scripts/review_order_benchmark.py``)."""
    return f"highest {REVIEW_SCORE.replace('_', ' ')} first"


@dataclass(frozen=True)
class ScoreRow:
    """One row of ``scores.csv``: a predicted case and its review scores.

    ``score`` is the review score (``REVIEW_SCORE``; higher: review first); ``label``,
    ``uncertainty`` and ``image`` are paths, absolute or relative to the file's folder. The
    ``CASE_SCORES`` columns follow; one a model cannot give (no second model, no dropout) is
    empty, and a file written before they existed reads without them.
    """

    case: str
    score: float
    foreground_voxels: int
    label: str
    uncertainty: str
    image: str
    boundary_uncertainty: Optional[float] = None
    disagreement: Optional[float] = None
    mutual_information: Optional[float] = None
    expected_changed_share: Optional[float] = None

    float_format: ClassVar[str] = "{}"

    def case_scores(self) -> dict:
        """The ``CASE_SCORES`` this row has, by name."""
        scores = ((name, getattr(self, name)) for name in CASE_SCORES)
        return {name: value for name, value in scores if value is not None}


@dataclass(frozen=True)
class MetricsRow:
    """One row of ``metrics.csv``: one class of one case (see ``backend.metrics``)."""

    case: str
    class_value: int
    class_name: str
    dice: float
    iou: float
    hd95_mm: float
    asd_mm: float
    penalty: str  # "none", "empty_prediction" or "empty_truth"

    float_format: ClassVar[str] = "{:.6f}"


Row = TypeVar("Row", ScoreRow, MetricsRow)


def columns(row_type: Type[Row]) -> tuple:
    """The column names of a table, in file order."""
    return tuple(field.name for field in fields(row_type))


SCORES_COLUMNS = columns(ScoreRow)
METRICS_COLUMNS = columns(MetricsRow)


def table_text(rows: Iterable[Row], row_type: Type[Row]) -> str:
    """CSV text of ``rows`` with a header line; floats in the table's ``float_format``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns(row_type))
    for row in rows:
        values = (getattr(row, name) for name in columns(row_type))
        writer.writerow(
            row_type.float_format.format(v) if isinstance(v, float) else v for v in values
        )
    return buffer.getvalue()


def read_table(path: Union[str, Path], row_type: Type[Row]) -> List[Row]:
    """The rows of a CSV table written by ``table_text``, in file order.

    Columns are found by name (extra columns are ignored); an empty whole-number cell reads as
    0; a column with a default (added to a table later) may be absent or empty and then reads
    as its default. Raises ProtocolError naming the file (and the line) when it cannot be read,
    lacks a column or holds a cell that is not a number where one is expected.
    """
    path = Path(path)
    names = [f.name for f in fields(row_type) if f.default is MISSING]
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in names if name not in (reader.fieldnames or [])]
            if missing:
                raise ProtocolError(f"{path}: missing column(s) {missing}")
            return [_row(record, row_type, path, line) for line, record in enumerate(reader, 2)]
    except OSError as err:
        raise ProtocolError(f"{path}: cannot read the table ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ProtocolError(f"{path}: not a UTF-8 text file (byte {err.start})") from None


def _row(record: dict, row_type: Type[Row], path: Path, line: int) -> Row:
    values = {}
    for field in fields(row_type):
        text = record.get(field.name) or ""
        try:
            if not text and field.default is not MISSING:
                values[field.name] = field.default
            elif field.type is int:
                values[field.name] = int(float(text or 0))
            elif field.type in (float, Optional[float]):
                values[field.name] = float(text)
            else:
                values[field.name] = text
        except ValueError:
            raise ProtocolError(
                f"{path}, line {line}: {field.name} is not a number ({text[:40]!r})"
            ) from None
    return row_type(**values)
