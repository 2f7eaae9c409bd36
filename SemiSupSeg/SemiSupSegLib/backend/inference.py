"""Prediction: MONAI sliding-window inference with gaussian blending, a label map and a voxel-wise
uncertainty map per case in the input's exact geometry, and per-case scores for review order.

Uncertainty is the entropy of the predicted class distribution, in nats (0 .. ln C): the
softmax entropy for one pass, or with ``mc_samples`` > 1 the mean entropy of Monte Carlo
dropout passes. The case scores (``case_scores``: the boundary uncertainty, the disagreement
with the method's other trained model, BALD, the expected changed share) say which case to
review first; ``scores.csv`` holds them all and its ``score`` column the one the product
ships (``output_layout.REVIEW_SCORE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from SemiSupSegLib.backend.atomic_files import write_text_atomic
from SemiSupSegLib.backend.case_scores import (  # noqa: F401  (boundary_score re-exported)
    CaseScores,
    boundary_score,
    working_grid_scores,
)
from SemiSupSegLib.backend.checkpoint import load_checkpoint, model_file
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Case
from SemiSupSegLib.backend.device import select_device
from SemiSupSegLib.backend.errors import CancelledError, ConfigError, DataError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.folder_lock import FolderLock
from SemiSupSegLib.backend.networks import SegmentationNetwork, network_from_spec
from SemiSupSegLib.backend.networks2d import SliceWise
from SemiSupSegLib.backend.prediction_manifest import (
    COMPLETE,
    PARTIAL,
    case_entry,
    check_replaceable,
    write_manifest,
)
from SemiSupSegLib.backend.preprocessing import (
    PreparedVolume,
    prepare_volume,
    resample_like,
    xyz_to_zyx,
)
from SemiSupSegLib.backend.staging import StagedFolder
from SemiSupSegLib.backend.uncertainty import (  # noqa: F401  (re-exported)
    batched_passes,
    enable_mc_dropout,
    entropy,
    has_dropout,
    uncertainty_from_passes,
)
from SemiSupSegLib.backend.validation import validate_image
from SemiSupSegLib.backend.volumes import read_image, write_image
from SemiSupSegLib.output_layout import (
    CHECKPOINT_FILE,
    SCORES_FILE,
    ScoreRow,
    label_file_name,
    table_text,
    uncertainty_file_name,
)
from SemiSupSegLib.protocol import case_name_problem, shorten

#: Slices a slice-wise companion model predicts per forward.
COMPANION_SLICES = 16
#: Monte Carlo dropout passes at most: each pass holds a copy of the class probabilities.
MAX_MC_SAMPLES = 100


@dataclass
class CasePrediction:
    """One predicted case: label and uncertainty images, its review ``score``
    (``scores.review``) and all its case scores."""

    name: str
    label: sitk.Image
    uncertainty: sitk.Image
    score: float
    foreground_voxels: int
    scores: CaseScores


def companion_network(
    path: Path, model: Dict[str, Any], device: torch.device
) -> Optional[nn.Module]:
    """The method's other trained model beside the one it deploys (M&N's 2D model), from the
    checkpoint beside the model file ``path`` (read: ``model``), in eval mode; None when the
    method has none, or the checkpoint is absent, unreadable or of another training than the
    model file (another run, or an unfinished one)."""
    from SemiSupSegLib.backend.methods import Method, create_method, method_class
    from SemiSupSegLib.method_catalogue import ENCODER_WEIGHTS_OPTION

    checkpoint = path.parent / CHECKPOINT_FILE
    if not checkpoint.exists():
        return None
    try:
        state = load_checkpoint(checkpoint) if checkpoint != path else model
        if (state.get("run_id"), state.get("iteration")) != (
            model.get("run_id"),
            model.get("iteration"),
        ):
            return None
        config = TrainConfig.from_dict(state["config"])
        cls = method_class(config.method)
        if cls.companions is Method.companions:
            return None
        if cls.needs_2d_encoder:  # its weights come from the checkpoint: no download, no file
            options = {**config.method_options, ENCODER_WEIGHTS_OPTION: "none"}
            config = TrainConfig.from_dict({**state["config"], "method_options": options})
        num_classes = int(state["model"]["spec"]["num_classes"])
        method = create_method(config, num_classes, device)
        companions = method.companions()
        if len(companions) != 1:
            return None
        ((name, network),) = companions.items()
        network.load_state_dict(state["method_state"][name])
    except (KeyError, RuntimeError, TypeError, ValueError):  # DataError, ConfigError too
        return None  # the disagreement score is left out; the prediction itself is unaffected
    return network.to(device).eval()


class Predictor:
    """A trained network plus the preprocessing it was trained with."""

    def __init__(
        self,
        network: SegmentationNetwork,
        classes: Dict[int, str],
        preprocessing: Dict[str, Any],
        device: torch.device,
        overlap: Optional[float] = None,
        sw_batch_size: Optional[int] = None,
        mc_chunk: Optional[int] = None,
        companion: Optional[nn.Module] = None,
    ) -> None:
        """``overlap`` and ``sw_batch_size`` (None: the model's ``sliding_window_overlap`` and
        ``sliding_window_batch``, or their defaults in a model written before they were kept).
        ``companion``: the method's other trained model (``companion_network``), which maps
        the same input to class logits; its disagreement with ``network`` is a case score."""
        self.network = network.to(device).eval()
        self.companion = companion.to(device).eval() if companion is not None else None
        self.classes = classes
        self.preprocessing = preprocessing
        self.device = device
        self.overlap = float(
            preprocessing.get("sliding_window_overlap", TrainConfig.sliding_window_overlap)
            if overlap is None
            else overlap
        )
        self.sw_batch_size = int(
            preprocessing.get("sliding_window_batch", TrainConfig.sliding_window_batch)
            if sw_batch_size is None
            else sw_batch_size
        )
        self.mc_chunk = mc_chunk
        self.roi_size = xyz_to_zyx(preprocessing["patch_size"])
        #: The model file and its iteration, recorded in the predictions' manifest.
        self.source: Dict[str, Any] = {}

    @classmethod
    def from_run(
        cls, run: str | Path, device: str = "auto", companion: bool = True, **kwargs: Any
    ) -> Predictor:
        """Load ``model.pt`` (or ``checkpoint.pt``) from a run folder or a file path, and with
        ``companion`` the method's other trained model where the run has one
        (``companion_network``)."""
        path = model_file(run)
        state = load_checkpoint(path)
        network = network_from_spec(state["model"]["spec"])
        network.load_state_dict(state["model"]["state_dict"])
        classes = {int(k): v for k, v in state["classes"].items()}
        torch_device = select_device(device)
        other = companion_network(path, state, torch_device) if companion else None
        predictor = cls(
            network, classes, state["preprocessing"], torch_device, companion=other, **kwargs
        )
        predictor.source = {
            "file": str(path.absolute()),
            "iteration": state.get("iteration"),
            "iterations": state.get("config", {}).get("iterations"),
            "run_id": state.get("run_id"),
        }
        if other is not None:
            predictor.source["companion"] = str((path.parent / CHECKPOINT_FILE).absolute())
        return predictor

    def prepare(self, name: str, image: sitk.Image) -> PreparedVolume:
        p = self.preprocessing
        return prepare_volume(
            name,
            image,
            None,
            p["modality"],
            p.get("target_spacing"),
            tuple(p.get("ct_window", (-1000, 1000))),
            p.get("ct_foreground_stats"),
        )

    @torch.no_grad()
    def sliding_window(
        self, image: torch.Tensor, mc_samples: int = 1, network: Optional[nn.Module] = None
    ) -> torch.Tensor:
        """Gaussian-blended logits (1, passes * C, z, y, x) of ``image`` (1, 1, z, y, x), on
        the device: all the network work of a prediction.

        ``sw_batch_size`` windows go through the network per forward; with ``mc_samples`` > 1
        the Monte Carlo dropout passes are copies of those windows in the same forward (at
        most ``mc_chunk`` copies at a time), blended per pass as extra channels. ``network``:
        another model to run the same way (default: the deployed one).
        """
        network = self.network if network is None else network
        passes = max(1, mc_samples)
        network.eval()
        if passes > 1:
            enable_mc_dropout(network)

        def all_passes(window: torch.Tensor) -> torch.Tensor:
            # (passes, n, C, ...) -> (n, passes * C, ...): the blending treats passes as channels
            out = batched_passes(network, window, passes, chunk=self.mc_chunk)
            return out.transpose(0, 1).reshape(window.shape[0], -1, *out.shape[3:])

        try:
            return sliding_window_inference(
                image,
                self.roi_size,
                self.sw_batch_size,
                all_passes,
                overlap=self.overlap,
                mode="gaussian",
                padding_mode="constant",
            )
        finally:
            network.eval()

    @torch.no_grad()
    def softmax_passes(self, volume: PreparedVolume, mc_samples: int = 1) -> torch.Tensor:
        """Class probabilities of each pass (passes, 1, C, z, y, x) on the working grid, on
        the device (``sliding_window``)."""
        image = torch.as_tensor(volume.image[None], device=self.device)
        passes = max(1, mc_samples)
        num_classes = int(self.network.spec["num_classes"])
        logits = self.sliding_window(image, passes)
        return torch.softmax(
            logits.float()[0].reshape(passes, num_classes, *logits.shape[2:]), dim=1
        )[:, None]

    @staticmethod
    def summarise(stacked: torch.Tensor) -> tuple:
        """Mean class probabilities (C, z, y, x) and uncertainty (z, y, x) of the passes
        ``stacked`` (passes, 1, C, z, y, x): the mean of the passes' entropies, or for one
        pass its softmax entropy."""
        mean = stacked.mean(0)[0]
        if stacked.shape[0] > 1:
            uncertainty = uncertainty_from_passes(stacked, "mean-entropy")[0]
        else:
            uncertainty = entropy(mean, dim=0)
        return mean, uncertainty

    @torch.no_grad()
    def probabilities(self, volume: PreparedVolume, mc_samples: int = 1) -> tuple:
        """Class probabilities (C, z, y, x) and uncertainty (z, y, x) on the working grid.

        With ``mc_samples`` > 1 the Monte Carlo dropout passes run batched inside each sliding
        window (see ``sliding_window``); the map is the mean of the passes' entropies.
        """
        mean, uncertainty = self.summarise(self.softmax_passes(volume, mc_samples))
        return mean.cpu().numpy(), uncertainty.cpu().numpy()

    @torch.no_grad()
    def companion_probabilities(self, volume: PreparedVolume) -> Optional[np.ndarray]:
        """The companion model's class probabilities (C, z, y, x) on the working grid, or
        None without a companion. A slice-wise 2D model (M&N's) sees whole slices, a few at a
        time: each slice once, with all its context (no windows to blend, an eighth of the
        work of overlapping ones); any other model goes through the sliding window."""
        if self.companion is None:
            return None
        image = torch.as_tensor(volume.image[None], device=self.device)
        if isinstance(self.companion, SliceWise):
            chunk = self.companion.chunk
            self.companion.chunk = COMPANION_SLICES
            try:
                logits = self.companion(image)
            finally:
                self.companion.chunk = chunk
        else:
            logits = self.sliding_window(image, 1, self.companion)
        return torch.softmax(logits.float()[0], dim=0).cpu().numpy()

    def predict(self, name: str, image: sitk.Image, mc_samples: int = 1) -> CasePrediction:
        """Predict one case; the label and uncertainty images have ``image``'s geometry."""
        volume = self.prepare(name, image)
        stacked = self.softmax_passes(volume, mc_samples)
        mean, uncertainty = self.summarise(stacked)
        information = None
        if stacked.shape[0] > 1 and has_dropout(self.network):
            information = uncertainty_from_passes(stacked, "mutual-information")[0].cpu().numpy()
        probs, uncertainty = mean.cpu().numpy(), uncertainty.cpu().numpy()
        del stacked, mean
        working = working_grid_scores(probs, information, self.companion_probabilities(volume))
        if volume.working.GetSize() != image.GetSize() or self.preprocessing.get("target_spacing"):
            probs = np.stack([_resample_array(p, volume.working, image) for p in probs])
            uncertainty = _resample_array(uncertainty, volume.working, image)
        label = probs.argmax(0).astype(np.uint8)
        uncertainty = np.clip(uncertainty, 0.0, None).astype(np.float32)
        label_image = sitk.GetImageFromArray(label)
        label_image.CopyInformation(image)
        uncertainty_image = sitk.GetImageFromArray(uncertainty)
        uncertainty_image.CopyInformation(image)
        scores = CaseScores(boundary_uncertainty=boundary_score(label, uncertainty), **working)
        return CasePrediction(
            name, label_image, uncertainty_image, scores.review, int((label > 0).sum()), scores
        )


def _resample_array(array: np.ndarray, working: sitk.Image, original: sitk.Image) -> np.ndarray:
    moving = sitk.GetImageFromArray(array.astype(np.float32))
    moving.CopyInformation(working)
    return sitk.GetArrayFromImage(resample_like(moving, original, is_label=False))


def output_name(case: Case) -> str:
    """The case's label map file name in a prediction folder (``label_file_name``).

    Raises DataError for a case name that is not a plain file name (it would be written
    outside the output folder)."""
    problem = case_name_problem(case.name)
    if problem:
        raise DataError(case.image, f"case name {shorten(repr(case.name))} {problem}")
    return label_file_name(case.name, str(case.image))


def predict_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    out_dir: str | Path,
    mc_samples: int = 1,
    events: Optional[EventSink] = None,
    stop: Any = None,
) -> List[ScoreRow]:
    """Predict every case into the prediction folder ``out_dir`` (``output_layout``): a label
    map and an uncertainty map per case, ``scores.csv`` and the manifest ``predictions.json``
    (model, time, cases). Returns the rows of ``scores.csv``, most uncertain first.

    Every input is checked before anything is written. The outputs are written into a temporary
    folder beside ``out_dir`` that replaces it whole once all are written (``staging``), under
    ``out_dir``'s lock, so a failed, cancelled or killed prediction never leaves a mix of runs.
    """
    events = events or EventSink(quiet=True)
    out_dir = Path(out_dir).absolute()
    if not 1 <= mc_samples <= MAX_MC_SAMPLES:
        raise ConfigError(f"mc_samples must be 1 to {MAX_MC_SAMPLES}, got {mc_samples}")
    names = [output_name(case) for case in cases]
    _check_apart(out_dir, cases)
    total = len(cases)
    events.emit("stage", stage="validation", message=f"checking {total} image(s)")
    for case in cases:
        validate_image(case.image)
    source = predictor.source
    if source.get("iteration") is not None and source["iteration"] < (source["iterations"] or 0):
        events.warn(
            f"{source['file']}: predicting with the checkpoint of an unfinished training "
            f"(iteration {source['iteration']} of {source['iterations']}), not a finished model"
        )
    rows: List[ScoreRow] = []
    with FolderLock(out_dir):
        check_replaceable(out_dir)
        with StagedFolder(out_dir) as staged:
            listed = [case_entry(c.name, n) for c, n in zip(cases, names)]
            write_manifest(staged.staging, source, listed, PARTIAL)
            events.emit("stage", stage="prediction", iteration=0, total=total)
            for index, (case, name) in enumerate(zip(cases, names)):
                if stop is not None and stop.requested:
                    raise CancelledError(f"prediction cancelled after {index} of {total} cases")
                result = predictor.predict(case.name, read_image(case.image), mc_samples)
                write_image(result.label, staged.staging / name)
                write_image(result.uncertainty, staged.staging / uncertainty_file_name(name))
                rows.append(
                    ScoreRow(
                        case=case.name,
                        score=round(result.score, 6),
                        foreground_voxels=result.foreground_voxels,
                        label=str(out_dir / name),
                        uncertainty=str(out_dir / uncertainty_file_name(name)),
                        image=str(case.image),
                        **{
                            key: None if value is None else round(value, 6)
                            for key, value in result.scores.as_dict().items()
                        },
                    )
                )
                events.progress("prediction", index + 1, total, message=case.name)
            rows.sort(key=lambda r: -r.score)
            write_scores(rows, staged.staging / SCORES_FILE)
            write_manifest(staged.staging, source, listed, COMPLETE, [SCORES_FILE])
            staged.commit()
    scores_path = out_dir / SCORES_FILE
    events.emit(
        "output",
        stage="prediction",
        message=f"predicted {total} case(s) into {out_dir}",
        outputs={"predictions": str(out_dir), "scores": str(scores_path)},
    )
    return rows


def _check_apart(out_dir: Path, cases: Sequence[Case]) -> None:
    """Refuse an output folder that is, or holds, one of the inputs: replacing it would
    destroy the input."""
    out = out_dir.resolve()
    for case in cases:
        image = Path(case.image).resolve()
        if image == out or out in image.parents:
            raise DataError(
                out_dir,
                f"the output folder is or holds the input {case.image}; predictions would "
                "replace it; choose another output folder",
            )


def write_scores(rows: List[ScoreRow], path: Path) -> None:
    """Write ``scores.csv`` (``output_layout.ScoreRow``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, table_text(rows, ScoreRow))
