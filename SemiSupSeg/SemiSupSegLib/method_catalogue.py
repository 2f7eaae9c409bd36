"""The training methods by name: what each does, what it needs, its settings; the default.

Standard library only, like ``protocol.py``: the Slicer side cannot import the backend (torch),
so the built-in methods are written down here, once, for both sides. For each method: its name,
a one-line description, whether it learns from unlabeled images (a job without any is refused),
whether it co-trains a 2D model whose timm encoder its option ``encoder`` names (the panel's 2D
encoder field), and every ``method.*`` option with its default (the CPU preset's value), what
it does and the published value. ``DEFAULT_METHOD`` is the one default of the command line, the
panel, job files and ``TrainConfig``. The protocol, the command line, the panel and the scripts
read this module instead of lists of their own.

The backend's registry (``backend/methods/base.py``, ``register_method``) holds the code and
each method's options dataclass, and is checked against this file by a test
(``Testing/test_method_catalogue.py``): the same names, capabilities, options, defaults and
documentation. A built-in option is so written twice, here and in its dataclass; the test
names the entry the code implies when they differ. A method registered only in the backend, a plugin (e.g. a toy method in a
test), is added here by ``register_method`` through ``add``: in that process the command line's
choices, the check of a job and the scripts list it, and nothing else needs an edit. The Slicer
process never imports the backend, so it lists the built-in methods only. The other way round,
building this catalogue from the registry at import, would leave the Slicer side with no list;
a generated copy would be a second place the built-in names are written.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

#: The method the command line, the panel, a job file and ``TrainConfig`` use unless told
#: otherwise. M&N: on the hippocampus benchmark (docs/benchmarks.md, earlier protocol) it beat
#: supervised training at 4, 8 and 16 labeled cases at the same budget; on Left Atrium's
#: validation cases it has not (yet) beaten it, which is under measurement (issue 15).
DEFAULT_METHOD = "mn"
#: The method every semi-supervised one is measured against: labeled cases only, the quickest
#: (the demo trains it), and the one choice for a job without unlabeled images.
BASELINE_METHOD = "supervised"
#: The option that names the timm encoder of a method's 2D model (``needs_2d_encoder``).
ENCODER_OPTION = "encoder"
#: The option that says where that encoder's starting weights come from ("none": random).
ENCODER_WEIGHTS_OPTION = "encoder_weights"

#: ``OptionInfo.published`` when the published value is the default.
AS_PUBLISHED = "as published"
#: ``OptionInfo.published`` when no published value is recorded: a setting of this
#: implementation, or one the paper does not state.
NOT_PUBLISHED = "n/a"


@dataclass(frozen=True)
class OptionInfo:
    """One ``method.NAME`` setting.

    ``default`` is the CPU preset's value (what a run uses unless told otherwise); ``help`` says
    what the setting does; ``published`` is the value of the method's paper or reference code
    (``AS_PUBLISHED``: the default; ``NOT_PUBLISHED``: none recorded).
    """

    name: str
    default: Any
    help: str
    published: str = AS_PUBLISHED


@dataclass(frozen=True)
class MethodInfo:
    """What the panel, the protocol and the command line know of a training method."""

    name: str
    description: str
    uses_unlabeled: bool
    needs_2d_encoder: bool
    options: Tuple[OptionInfo, ...] = ()

    def option(self, name: str) -> OptionInfo:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(f"method {self.name!r} has no option {name!r}")


def _with(options: Tuple[OptionInfo, ...], *changed: OptionInfo) -> Tuple[OptionInfo, ...]:
    """``options`` with the ones of the same name replaced by ``changed`` (other defaults of a
    variant), and the new ones last."""
    by_name = {option.name: option for option in changed}
    kept = tuple(by_name.pop(option.name, option) for option in options)
    return kept + tuple(by_name.values())


_UNLABELED_MODE = (
    "replace: the unlabeled patches take the place of labeled ones in a batch of batch_size; "
    "add: they come on top of batch_size labeled patches (chosen on the validation cases of "
    "Left Atrium, docs/benchmarks.md)"
)

_MN_OPTIONS = (
    OptionInfo(
        "encoder",
        "mobilenetv2_100",
        "timm encoder of the 2D model (any timm name; MobileNetV2 has offline weights)",
        "SegFormer-B2 (mit_b2; its weights need a download)",
    ),
    OptionInfo(
        "encoder_weights",
        "auto",
        "the 2D encoder's weights: auto, offline, timm, none (random) or a weights file",
        "natural-image pretrained",
    ),
    OptionInfo(
        "encoder_out_indices",
        (0, 1, 2, 3),
        "encoder feature levels used (strides 2 to 16; the stride-32 level of a 48x32 slice is "
        "2x1 voxels); None: all",
        NOT_PUBLISHED,
    ),
    OptionInfo("decoder_channels", 32, "channels of the 2D model's light decoder", NOT_PUBLISHED),
    OptionInfo(
        "slice_axis",
        "z",
        "axis the 2D model slices along: z (SimpleITK's through-plane axis), y or x",
        NOT_PUBLISHED,
    ),
    OptionInfo(
        "slice_scale", 1.0, "slices are upsampled by this before the encoder", NOT_PUBLISHED
    ),
    OptionInfo(
        "finetune",
        "all",
        "all: every layer learns, the encoder at encoder_lr_factor of the 2D rate; frozen: the "
        "decoder only",
        "LoRA on SegFormer (not offered)",
    ),
    OptionInfo(
        "encoder_lr_factor",
        0.1,
        "the encoder's share of the 2D learning rate (finetune=all)",
        NOT_PUBLISHED,
    ),
    OptionInfo("lr_2d", 1e-3, "peak learning rate of the 2D model"),
    OptionInfo(
        "lr_3d",
        None,
        "peak learning rate of the 3D model; None: the run's learning_rate (3e-3 on a CPU)",
        "1e-4 (for ~32k iterations: far too slow for 1500)",
    ),
    OptionInfo(
        "warmup_stage_fraction",
        0.125,
        "share of the run in stage 1, where both models learn from the labels only "
        "(published: 500 of 4000 epochs)",
    ),
    OptionInfo(
        "lr_warmup_fraction",
        0.0125,
        "share of the run in the linear learning-rate warm-up (published: 50 of 4000 epochs)",
    ),
    OptionInfo(
        "alternation",
        "iteration",
        "iteration: every co-training iteration the 2D model learns from the 3D one, then the "
        "3D from the 2D; phase: phase_length iterations for one model, then the other",
        "phase",
    ),
    OptionInfo(
        "phase_length",
        8,
        "iterations of a phase (alternation=phase; published: one reference epoch)",
    ),
    OptionInfo(
        "train_slices",
        8,
        "slices per patch the 2D student learns from, drawn at random (0: all); the 2D teacher "
        "always predicts every slice",
        "0 (all slices)",
    ),
    OptionInfo(
        "min_labeled",
        1,
        "labeled patches kept in every batch (unlabeled_mode=replace)",
        NOT_PUBLISHED,
    ),
    OptionInfo("unlabeled_mode", "add", _UNLABELED_MODE, "replace (the sampling of the paper)"),
)

_MC_PASSES = "the teacher's Monte Carlo passes over the unlabeled patches"
_UNCERTAINTY = "the teacher's uncertainty: mean-entropy, entropy-of-mean or mutual-information"
_DROPOUT = "dropout of the 3D network; None: the run's dropout"
_CONSISTENCY = "mse: of the softmax to the teacher's (MT, UA-MT); ce: to the teacher's argmax (em)"

_MONTE_CARLO_TEACHER_OPTIONS = (
    OptionInfo("mc_passes", 1, _MC_PASSES),
    OptionInfo(
        "teacher_noise",
        0.01,
        "std of the Gaussian noise added to the teacher's input",
        NOT_PUBLISHED,
    ),
    OptionInfo("uncertainty", "entropy-of-mean", _UNCERTAINTY),
    OptionInfo(
        "threshold_scale",
        None,
        "final value of the uncertainty threshold; None: ln C (C classes)",
    ),
    OptionInfo(
        "ramp_fraction",
        1.0,
        "share of the run after which the ramped weights and threshold reach their final values",
        NOT_PUBLISHED,
    ),
)

_TEACHER_STUDENT_OPTIONS = _MONTE_CARLO_TEACHER_OPTIONS + (
    OptionInfo("dropout", None, _DROPOUT, NOT_PUBLISHED),
    OptionInfo("ema_decay", 0.99, "decay of the teacher's exponential moving average"),
    OptionInfo(
        "mc_chunk",
        0,
        "at most this many passes per batched forward (0: all at once)",
        NOT_PUBLISHED,
    ),
    OptionInfo(
        "student_noise",
        0.02,
        "std of the Gaussian noise added to the student's input",
        NOT_PUBLISHED,
    ),
    OptionInfo(
        "uncertainty_filter",
        True,
        "learn the consistency only on voxels whose uncertainty is under the rising threshold",
    ),
    OptionInfo("consistency", "mse", _CONSISTENCY),
    OptionInfo("consistency_weight", 0.1, "final value of the ramped consistency weight"),
    OptionInfo(
        "unlabeled_batch",
        None,
        "unlabeled patches per batch, on top of batch_size labeled ones; None: half of "
        "batch_size; 0: batch_size in all, half of them unlabeled",
        "0",
    ),
    OptionInfo("deploy", "teacher", "the network predict uses: teacher or student", NOT_PUBLISHED),
)

_EM_MATCHING_OPTIONS = (
    OptionInfo("references_k", 16, "reference voxels drawn per class from each labeled patch (k)"),
    OptionInfo("references_repeats", 5, "draws of references_k voxels per patch (l)"),
    OptionInfo(
        "band",
        (1, 3),
        "distance in voxels to a class's surface of its reference voxels: nearest, farthest",
    ),
    OptionInfo(
        "temperature", 1.0, "temperature of the softmax over per-class similarities in L_EN"
    ),
)

_BUILT_IN = (
    MethodInfo(
        "supervised",
        "labeled cases only: one 3D network, Dice + cross-entropy; the baseline",
        uses_unlabeled=False,
        needs_2d_encoder=False,
    ),
    MethodInfo(
        "mn",
        "M&N (Yeung et al. 2025): a pretrained 2D model and the 3D network teach each other "
        "on the unlabeled images",
        uses_unlabeled=True,
        needs_2d_encoder=True,
        options=_MN_OPTIONS,
    ),
    MethodInfo(
        "em",
        "embedding matching (Xie et al. 2024): UA-MT whose unreliable voxels take the class "
        "their embedding matches in the labeled patches",
        uses_unlabeled=True,
        needs_2d_encoder=False,
        options=_with(
            _TEACHER_STUDENT_OPTIONS,
            OptionInfo("dropout", 0.15, _DROPOUT),
            OptionInfo("mc_passes", 2, _MC_PASSES, "5"),
            OptionInfo("uncertainty", "mean-entropy", _UNCERTAINTY),
            OptionInfo("consistency", "ce", _CONSISTENCY),
            OptionInfo(
                "consistency_weight",
                0.25,
                "final value of the ramped weight of the loss on reliable voxels (w_UA)",
            ),
            *_EM_MATCHING_OPTIONS,
            OptionInfo(
                "matching_weight",
                0.125,
                "final value of the ramped weight of L_NN + L_EN on unreliable voxels (w_PS)",
            ),
            OptionInfo(
                "entropy_regulariser",
                True,
                "add L_EN, the entropy of the softmax over per-class similarities",
            ),
            OptionInfo(
                "matching_reduction",
                "all",
                "all: the matching losses summed over the unreliable voxels, divided by every "
                "unlabeled voxel; unreliable: their mean over the unreliable voxels",
                "unreliable",
            ),
        ),
    ),
    MethodInfo(
        "mn+em",
        "M&N co-training whose least certain voxels take the class their 3D embedding matches",
        uses_unlabeled=True,
        needs_2d_encoder=True,
        options=_with(
            _MN_OPTIONS,
            OptionInfo(
                "unlabeled_mode", "replace", _UNLABELED_MODE + "; mn+em was not measured with add"
            ),
        )
        + _with(
            _MONTE_CARLO_TEACHER_OPTIONS,
            OptionInfo("mc_passes", 2, _MC_PASSES, "5"),
            OptionInfo("uncertainty", "mean-entropy", _UNCERTAINTY),
        )
        + _EM_MATCHING_OPTIONS
        + (
            OptionInfo(
                "dropout",
                0.15,
                "dropout of the 3D network (the 2D model has none: its passes differ by noise)",
                NOT_PUBLISHED,
            ),
            OptionInfo(
                "disagreement",
                False,
                "voxels where the 2D and 3D models' argmax differ are unsure too (on the "
                "benchmark it fed a loop that collapsed training)",
                "true (the method's description)",
            ),
            OptionInfo(
                "max_unreliable_share",
                0.05,
                "at most this share of a batch's voxels, the most uncertain, is matched; None: "
                "no limit",
                "None",
            ),
            OptionInfo(
                "entropy_weight",
                0.125,
                "final value of the ramped weight of L_EN on the 3D student",
            ),
        ),
    ),
    MethodInfo(
        "mean-teacher",
        "Mean Teacher (Tarvainen & Valpola 2017): softmax consistency with an EMA teacher on "
        "every unlabeled voxel",
        uses_unlabeled=True,
        needs_2d_encoder=False,
        options=_with(
            _TEACHER_STUDENT_OPTIONS,
            OptionInfo(
                "uncertainty_filter",
                False,
                "learn the consistency only on voxels whose uncertainty is under the rising "
                "threshold",
            ),
        ),
    ),
    MethodInfo(
        "ua-mt",
        "UA-MT (Yu et al. 2019): Mean Teacher on the voxels its Monte Carlo dropout teacher is "
        "sure of",
        uses_unlabeled=True,
        needs_2d_encoder=False,
        options=_with(
            _TEACHER_STUDENT_OPTIONS,
            OptionInfo("dropout", 0.15, _DROPOUT, NOT_PUBLISHED),
            OptionInfo("mc_passes", 2, _MC_PASSES, "8"),
        ),
    ),
    MethodInfo(
        "bcp",
        "BCP (Bai et al. 2023): labeled and unlabeled patches pasted into each other both "
        "ways, learned from an EMA teacher's pseudo-labels",
        uses_unlabeled=True,
        needs_2d_encoder=False,
        options=(
            OptionInfo(
                "pretrain_fraction",
                0.3,
                "share of the run in stage 1, supervised on labeled patches pasted into each "
                "other (the teacher of stage 2 starts from its network)",
                "0.118 (2000 of 17000 iterations)",
            ),
            OptionInfo(
                "cuboid_ratio", 2 / 3, "side of the pasted cuboid as a share of each patch side"
            ),
            OptionInfo(
                "cuboid_position",
                "random",
                "where the cuboid sits: random (anywhere in the patch, redrawn every iteration) "
                "or centre",
            ),
            OptionInfo(
                "unlabeled_weight",
                0.5,
                "weight of the loss on the voxels that come from unlabeled patches",
            ),
            OptionInfo("ema_decay", 0.99, "decay of the teacher's exponential moving average"),
            OptionInfo(
                "largest_component",
                True,
                "keep only the largest connected component of each class in the teacher's "
                "pseudo-labels, per patch",
            ),
            OptionInfo(
                "restart_lr",
                True,
                "the learning rate anneals to 0 at the end of stage 1 and restarts for stage 2; "
                "false: one warm-up and cosine over the run",
                "true (SGD at 0.01, constant in stage 1; a fresh one at 0.01 in stage 2, x0.1 "
                "every 2500 iterations)",
            ),
            OptionInfo("deploy", "student", "the network predict uses: student or teacher"),
        ),
    ),
)

_BUILT_IN_NAMES = tuple(info.name for info in _BUILT_IN)
_METHODS: Dict[str, MethodInfo] = {info.name: info for info in _BUILT_IN}


def add(info: MethodInfo) -> None:
    """Make a method that the backend registered beyond the built-in ones (a plugin) known
    in this process; a later ``add`` of the same name replaces it.

    Raises:
        ValueError: ``info`` names a built-in method (those are written here).
    """
    if info.name in _BUILT_IN_NAMES:
        raise ValueError(f"method {info.name!r} is built in; its entry is method_catalogue's")
    _METHODS[info.name] = info


def is_built_in(name: str) -> bool:
    return name in _BUILT_IN_NAMES


def methods() -> Tuple[MethodInfo, ...]:
    """Every method known in this process: the built-in ones, then those ``add``-ed."""
    return tuple(_METHODS.values())


def method_names() -> Tuple[str, ...]:
    return tuple(_METHODS)


def method_info(name: str) -> Optional[MethodInfo]:
    """The method called ``name``, or None when there is none."""
    return _METHODS.get(name)


def describe_methods() -> str:
    """One line per method, the default marked: the panel's and the command line's help."""
    lines = []
    for info in methods():
        default = " (default)" if info.name == DEFAULT_METHOD else ""
        lines.append(f"{info.name}{default}: {info.description}")
    return "\n".join(lines)
