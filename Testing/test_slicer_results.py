"""Result import bookkeeping: review rows from scores.csv, label versions that never overwrite,
which round each label came from, and the inputs of a warm-started retraining round."""

import csv

import pytest

from SemiSupSegLib.job_export import ClassTable
from SemiSupSegLib.output_layout import (
    MODEL_FILE,
    PREDICTIONS_FOLDER,
    RUN_FOLDER,
    SCORES_COLUMNS,
    SCORES_FILE,
    UNCERTAINTY_FOLDER,
    uncertainty_file_name,
)
from SemiSupSegLib.protocol import JobSpec, LabeledCase, UnlabeledCase
from SemiSupSegLib.results import (
    STATUS_ACCEPTED,
    ResultsError,
    Session,
    readScores,
    reserveVersionPath,
)


def write_scores(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORES_COLUMNS)
        writer.writerows(rows)


def test_read_scores_sorted_most_uncertain_first(tmp_path):
    scores = tmp_path / PREDICTIONS_FOLDER / SCORES_FILE
    write_scores(
        scores,
        [
            ["low", "0.1", "10", "low.nrrd", uncertainty_file_name("low.nrrd"), "/data/low.nrrd"],
            ["high", "0.9", "0", "/abs/high.nrrd", "/abs/u/high.nrrd", "/data/high.nrrd"],
        ],
    )
    rows = readScores(scores, roundNumber=2)
    assert [r.case for r in rows] == ["high", "low"]
    assert rows[0].label == "/abs/high.nrrd"
    assert rows[1].label == str((scores.parent / "low.nrrd").resolve())
    assert rows[1].uncertainty == str((scores.parent / UNCERTAINTY_FOLDER / "low.nrrd").resolve())
    assert (rows[0].round, rows[0].foregroundVoxels, rows[0].status) == (2, 0, "to review")


def test_case_scores_are_read_and_a_file_without_them_still_reads(tmp_path):
    """scores.csv's case-score columns reach the review row; an empty cell (a score the model
    cannot give) is left out, and a file written before the columns existed reads as before."""
    scores = tmp_path / SCORES_FILE
    cells = ["a", "0.5", "3", "a.nrrd", "u/a.nrrd", "/d/a.nrrd", "0.5", "", "", "0.25"]
    write_scores(scores, [cells])
    (row,) = readScores(scores)
    assert row.caseScores == {"boundary_uncertainty": 0.5, "expected_changed_share": 0.25}
    old = tmp_path / "old.csv"
    old.write_text("case,score,foreground_voxels,label,uncertainty,image\nb,0.2,1,b,u,i\n")
    (row,) = readScores(old)
    assert (row.case, row.score, row.caseScores) == ("b", 0.2, {})


def test_bad_scores_files_are_reported(tmp_path):
    bad = tmp_path / SCORES_FILE
    bad.write_text("case,score\na,1\n")
    with pytest.raises(ResultsError, match="missing column"):
        readScores(bad)
    write_scores(bad, [["a", "high", "1", "l", "u", "i"]])
    with pytest.raises(ResultsError, match="line 2: score is not a number"):
        readScores(bad)
    with pytest.raises(ResultsError, match="cannot read"):
        readScores(tmp_path / "none.csv")


def test_versions_never_overwrite(tmp_path):
    first = reserveVersionPath(tmp_path / "labels", "case_a")
    first.write_text("user's correction")
    second = reserveVersionPath(tmp_path / "labels", "case_a")
    assert (first.name, second.name) == ("case_a.v1.nrrd", "case_a.v2.nrrd")
    assert first.read_text() == "user's correction"
    (tmp_path / "labels" / "case_a.v3.nrrd").write_text("made elsewhere")
    assert reserveVersionPath(tmp_path / "labels", "case_a").name == "case_a.v4.nrrd"


def make_round(session, tmp_path, unlabeled=("u1", "u2", "u3")):
    number, folder = session.newRound()
    job = JobSpec(
        labeled=[LabeledCase("l1", "inputs/images/l1.nrrd", "inputs/labels/l1.nrrd")],
        unlabeled=[UnlabeledCase(n, f"inputs/unlabeled/{n}.nrrd") for n in unlabeled],
        classes={"0": "background", "1": "A"},
        output=".",
    )
    job.save(folder / "job.json")
    session.recordRound(number, folder, job, ClassTable(["A"], {"A": (1.0, 0.0, 0.0)}))
    return number, folder


def test_session_rounds_accept_and_retrain_inputs(tmp_path):
    session = Session.load(tmp_path)
    with pytest.raises(ResultsError, match="no finished round"):
        session.retrainInputs()
    number, folder = make_round(session, tmp_path)
    assert (number, folder.name) == (1, "round-001")
    assert session.reviewRows() == []  # not finished yet
    write_scores(
        folder / PREDICTIONS_FOLDER / SCORES_FILE,
        [
            [
                n,
                s,
                "5",
                str(folder / PREDICTIONS_FOLDER / f"{n}.nrrd"),
                "u",
                str(folder / f"inputs/unlabeled/{n}.nrrd"),
            ]
            for n, s in (("u1", "0.2"), ("u2", "0.7"), ("u3", "0.5"))
        ],
    )
    (folder / RUN_FOLDER).mkdir()
    (folder / RUN_FOLDER / MODEL_FILE).write_bytes(b"model")
    session.finishRound(number, "finished", {"model": str(folder / RUN_FOLDER / MODEL_FILE)})

    rows = session.reviewRows()
    assert [r.case for r in rows] == ["u2", "u3", "u1"]
    path = session.reserveLabelVersion("u2")
    path.write_text("label")
    session.accept("u2", rows[0].image, path, number)
    assert session.labelOrigin("u2") == "round 1 (v1)"
    assert session.labelOrigin("l1") == "user"

    reloaded = Session.load(tmp_path)  # everything survives a restart
    rows = reloaded.reviewRows()
    assert rows[0].status == STATUS_ACCEPTED and rows[0].acceptedLabel == str(path)
    assert rows[0].statusText() == "accepted (u2.v1.nrrd)"
    labeled, unlabeled, init_from = reloaded.retrainInputs()
    assert [(c.name, c.label) for c in labeled] == [("u2", str(path))]
    assert [c.name for c in unlabeled] == ["u1", "u3"]
    assert unlabeled[0].image == str((folder / "inputs/unlabeled/u1.nrrd").resolve())
    assert init_from == str(folder / RUN_FOLDER / MODEL_FILE)
    assert reloaded.classes.names == ["A"]

    number2, folder2 = reloaded.newRound()
    assert (number2, folder2.name) == (2, "round-002")


def test_a_failed_round_is_not_reviewed_or_retrained_from(tmp_path):
    session = Session.load(tmp_path)
    number, _ = make_round(session, tmp_path)
    session.finishRound(number, "failed")
    assert session.lastFinishedRound() is None
    assert session.reviewRows() == []


def test_corrupt_session_file(tmp_path):
    (tmp_path / "semisupseg-session.json").write_text("{not json")
    with pytest.raises(ResultsError, match="cannot read the session"):
        Session.load(tmp_path)
