"""The ``semisupseg`` command line: train, predict, evaluate, compare, run JOB.json, demo,
methods."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from SemiSupSegLib.method_catalogue import (
    AS_PUBLISHED,
    BASELINE_METHOD,
    DEFAULT_METHOD,
    NOT_PUBLISHED,
    method_info,
    method_names,
    methods,
)
from SemiSupSegLib.protocol import (
    DEFAULT_BUDGET,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    MODALITIES,
    TIME_BUDGETS,
    ProtocolError,
    shorten,
)

#: Longest error message reported: a message may quote a value the user gave, of any length.
MESSAGE_LIMIT = 2000

if TYPE_CHECKING:
    from SemiSupSegLib.backend.distributed import World


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semisupseg",
        description="Semi-supervised 3D medical image segmentation: train from a few labeled "
        "volumes plus many unlabeled ones, predict label maps with uncertainty, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu"
        )
        p.add_argument(
            "--events", help="write progress as JSON lines to this file ('-' for stdout)"
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar or messages on stderr")
        p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")

    def data_options(p: argparse.ArgumentParser) -> None:
        """Where the cases are, which keep their labels, which are left out."""
        p.add_argument(
            "--data",
            help="an MSD/nnU-Net dataset.json, or a folder with one, or a folder "
            "with imagesTr/ and labelsTr/",
        )
        p.add_argument("--images", help="folder of images (instead of --data)")
        p.add_argument("--labels", help="folder of label maps matched to --images by case name")
        p.add_argument("--unlabeled", help="folder of extra unlabeled images")
        p.add_argument(
            "--labeled",
            help="text file, one case name per line: only these keep their "
            "labels; every other case of the data is used as unlabeled",
        )
        p.add_argument(
            "--exclude", help="text file of case names to leave out entirely (test cases)"
        )

    def setting_options(p: argparse.ArgumentParser) -> None:
        """Training settings the user may give; they override the plan."""
        p.add_argument("--network", help="3D network: unet (default), segresnet, swinunetr")
        p.add_argument("--iterations", type=int, help="training iterations (default 1500)")
        p.add_argument("--seed", type=int)
        p.add_argument(
            "--modality",
            choices=MODALITIES,
            help="intensity normalisation; default from dataset.json, else MR (z-score)",
        )
        p.add_argument("--spacing", help="resample to this spacing in mm, e.g. 1,1,1 (x,y,z)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="any training setting, e.g. --set batch_size=2 --set method.ema_decay=0.99",
        )

    train = sub.add_parser(
        "train",
        help="train a model from labeled (and unlabeled) volumes",
        description="Train a model from labeled (and unlabeled) volumes. On several GPUs: "
        "torchrun --nproc_per_node=N -m SemiSupSegLib.backend train ... (each process trains "
        "batch_size patches per iteration; rank 0 writes the outputs).",
    )
    data_options(train)
    train.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=method_names(),
        help=f"training method (default {DEFAULT_METHOD}; {BASELINE_METHOD}: no unlabeled images "
        "needed); 'semisupseg methods' describes them and their method.* settings",
    )
    train.add_argument(
        "--budget",
        choices=list(TIME_BUDGETS),
        default=DEFAULT_BUDGET,
        help="training time in your terms, scaled to the device: quick, standard (default: "
        "about half an hour on a CPU, the published 6000 iterations on a GPU) or thorough; "
        "--iterations overrides it",
    )
    train.add_argument(
        "--plan",
        choices=["auto", "off"],
        default="auto",
        help="auto (default): plan spacing, patch, batch, network depth, normalisation and "
        "iterations from the data and the device, shown before training; off: the fixed CPU "
        "preset of TrainConfig",
    )
    setting_options(train)
    train.add_argument("--out", required=True, help="run folder for checkpoints and the model")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--init-from", help="warm-start from a previous run folder or model.pt")
    common(train)

    predict = sub.add_parser("predict", help="predict label and uncertainty maps")
    predict.add_argument("--run", required=True, help="run folder (or model.pt) from train")
    predict.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="image files, folders of images, or DICOM series folders",
    )
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument(
        "--mc-samples",
        type=int,
        default=1,
        help="Monte Carlo dropout passes for the uncertainty map (1: softmax entropy)",
    )
    common(predict)

    evaluate = sub.add_parser("evaluate", help="Dice, IoU, HD95, ASD of predictions against truth")
    evaluate.add_argument("--pred", required=True, help="folder of predicted label maps")
    evaluate.add_argument("--truth", required=True, help="folder of label maps, or a dataset.json")
    evaluate.add_argument("--out", required=True, help="folder for metrics.csv and summary.json")
    evaluate.add_argument("--debug", action="store_true")

    compare = sub.add_parser(
        "compare",
        help="which method suits your data: train several on the same labeled cases, score "
        "them on labeled cases held out of training, recommend one",
        description="Train each method on your labeled cases minus a few held out (and your "
        "unlabeled images), score them on the held-out cases, and recommend one: a "
        "semi-supervised method only when it beats supervised training on average and on most "
        "held-out cases. Writes OUT/<method>/run, OUT/<method>/predictions (of the held-out cases) and "
        "OUT/comparison.json.",
    )
    compare.add_argument(
        "--methods",
        nargs="+",
        default=[BASELINE_METHOD, DEFAULT_METHOD],
        choices=method_names(),
        help=f"methods to compare (default: {BASELINE_METHOD} {DEFAULT_METHOD}); "
        f"{BASELINE_METHOD} is the baseline",
    )
    compare.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="labeled cases held out of training to score on (default: a quarter, at least 2)",
    )
    compare.add_argument(
        "--budget",
        choices=list(TIME_BUDGETS),
        default="quick",
        help="time budget per method (default quick; --iterations overrides it)",
    )
    data_options(compare)
    setting_options(compare)
    compare.add_argument("--out", required=True, help="folder for the runs and comparison.json")
    compare.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped comparison in --out: finished methods are reused, an "
        "interrupted one continues from its checkpoint",
    )
    common(compare)
    run = sub.add_parser("run", help="run a job file (what the Slicer module writes)")
    run.add_argument("job", help="job.json (protocol v1)")
    run.add_argument("--resume", action="store_true")
    common(run)

    demo = sub.add_parser("demo", help="train and evaluate on MSD Hippocampus with 8 labels")
    demo.add_argument(
        "--data",
        help="MSD Hippocampus folder (default: $SEMISUPSEG_DATA, the cache, or a download)",
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    demo.add_argument("--iterations", type=int, help="training iterations (default 1500)")
    demo.add_argument(
        "--method",
        default=BASELINE_METHOD,
        choices=method_names(),
        help=f"training method (default {BASELINE_METHOD}, the quickest)",
    )
    common(demo)

    listing = sub.add_parser(
        "methods", help="the training methods, and the method.* settings of one of them"
    )
    listing.add_argument(
        "method", nargs="?", choices=method_names(), help="show this method's settings"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from SemiSupSegLib.backend.distributed import launched
    from SemiSupSegLib.backend.errors import CancelledError, ConfigError, DataError
    from SemiSupSegLib.backend.events import EventSink

    world = launched()
    debug = getattr(args, "debug", False)
    try:
        if world.is_main:
            events = EventSink(getattr(args, "events", None), quiet=getattr(args, "quiet", False))
        else:  # torchrun: rank 0 reports; the others write nothing and print only their errors
            events = EventSink(quiet=True)
    except OSError as err:
        print(f"error: cannot write the events file: {_os_error(err)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if world.enabled and args.command != "train":
            raise ConfigError(
                f"only train runs on several processes (torchrun), not {args.command}"
            )
        handler = {
            "train": _train,
            "predict": _predict,
            "evaluate": _evaluate,
            "compare": _compare,
            "run": _run_job,
            "demo": _demo,
            "methods": _methods,
        }[args.command]
        handler(args, events)
        events.emit("done", stage=args.command)
        return EXIT_OK
    except CancelledError as err:
        if not any(e["event"] == "cancelled" for e in events.history):
            events.emit("cancelled", stage=args.command, message=str(err))
        return EXIT_CANCELLED
    except (DataError, ConfigError, ProtocolError, OSError, RecursionError) as err:
        if isinstance(err, OSError):
            message = _os_error(err)
        elif isinstance(err, RecursionError):
            message = "input nested too deeply (e.g. a setting holding lists within lists)"
        else:
            message = str(err)
        return _failed(events, world, args.command, shorten(message, MESSAGE_LIMIT), debug)
    except Exception as err:  # noqa: BLE001 - report every failure to the GUI, then exit non-zero
        message = shorten(f"{type(err).__name__}: {err}", MESSAGE_LIMIT)
        return _failed(events, world, args.command, message, debug)
    finally:
        events.close()


def _failed(events, world: World, command: str, message: str, debug: bool) -> int:
    """Report an error as one event (the traceback only with ``--debug``); the exit code."""
    details = [shorten(traceback.format_exc(), 20 * MESSAGE_LIMIT)] if debug else [message]
    events.emit("error", stage=command, message=message, errors=details)
    _rank_error(world, message)
    if debug:
        traceback.print_exc()
    return EXIT_FAILED


def _os_error(err: OSError) -> str:
    """An operating system error in words, naming its file: "PATH: Permission denied"."""
    reason = err.strerror or str(err)
    files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


def _rank_error(world: World, message: str) -> None:
    """Show an error of a rank other than 0 on stderr (its events go nowhere)."""
    if not world.is_main:
        print(f"rank {world.rank}: error: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.backend.planned_training import train_planned

    dataset = _load_training_data(args)
    context = {"method": args.method, "device": args.device, "modality": dataset.modality}
    with StopFlag().installed() as stop:
        train_planned(
            dataset,
            context,
            _explicit_settings(args),
            args.out,
            events,
            stop,
            plan=args.plan == "auto",
            budget=args.budget,
            resume=args.resume,
            init_from=args.init_from,
        )


def _explicit_settings(args: argparse.Namespace) -> dict:
    """The settings given on the command line (options and ``--set``), by setting name."""
    from SemiSupSegLib.backend.config import parse_setting

    explicit = {}
    for name in ("network", "iterations", "seed", "modality"):
        if getattr(args, name) is not None:
            explicit[name] = getattr(args, name)
    if args.spacing:
        explicit["target_spacing"] = args.spacing
    for text in args.set:
        key, value = parse_setting(text)
        explicit[key] = value
    return explicit


def _compare(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.backend.method_comparison import compare_methods, format_comparison

    dataset = _load_training_data(args)
    explicit = _explicit_settings(args)
    with StopFlag().installed() as stop:
        comparison = compare_methods(
            dataset,
            args.methods,
            {"device": args.device, "modality": dataset.modality},
            explicit,
            Path(args.out),
            events,
            stop,
            holdout=args.holdout,
            seed=explicit.get("seed", 0),
            budget=args.budget,
            resume=args.resume,
        )
    _report(format_comparison(comparison), args)


def _load_training_data(args: argparse.Namespace):
    from SemiSupSegLib.backend.datasets import (
        exclude_cases,
        from_folders,
        infer_classes,
        load_dataset,
        read_case_list,
        with_labeled_subset,
    )
    from SemiSupSegLib.backend.errors import ConfigError

    if args.data:
        dataset = load_dataset(Path(args.data))
    elif args.images and args.labels:
        dataset = from_folders(
            Path(args.images), Path(args.labels), Path(args.unlabeled) if args.unlabeled else None
        )
    else:
        raise ConfigError("give --data, or --images with --labels")
    if dataset.classes is None:
        dataset.classes = infer_classes(dataset)
    if args.exclude:
        dataset = exclude_cases(dataset, read_case_list(Path(args.exclude)))
    if args.labeled:
        dataset = with_labeled_subset(dataset, read_case_list(Path(args.labeled)))
    return dataset


def _predict(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.backend.datasets import cases_from_paths
    from SemiSupSegLib.backend.inference import Predictor, predict_cases

    cases = cases_from_paths([Path(p) for p in args.input])
    predictor = Predictor.from_run(args.run, device=args.device)
    with StopFlag().installed() as stop:
        predict_cases(predictor, cases, args.out, args.mc_samples, events, stop)


def _evaluate(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.metrics import evaluate_folders, format_summary

    summary = evaluate_folders(Path(args.pred), Path(args.truth), Path(args.out))
    _report(format_summary(summary), args)


def _report(text: str, args: argparse.Namespace) -> None:
    """A command's result table: on stdout, unless the events stream goes there."""
    to_stdout = getattr(args, "events", None) != "-"
    print(text, file=sys.stdout if to_stdout else sys.stderr)


def _run_job(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.backend.jobs import run_job

    with StopFlag().installed() as stop:
        run_job(Path(args.job), events, stop, resume=args.resume)


def _demo(args: argparse.Namespace, events) -> None:
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.backend.demo import run_demo

    with StopFlag().installed() as stop:
        run_demo(
            args.data,
            Path(args.out),
            events,
            stop,
            iterations=args.iterations,
            method=args.method,
            device=args.device,
        )


def _methods(args: argparse.Namespace, events) -> None:
    """The catalogue as text: every method in a line, or one method's settings."""
    if args.method is None:
        for info in methods():
            default = " (default)" if info.name == DEFAULT_METHOD else ""
            print(f"{info.name}{default}: {info.description}")
        return
    info = method_info(args.method)
    needs = "unlabeled images" if info.uses_unlabeled else "labeled images only"
    encoder = ", a 2D model (method.encoder)" if info.needs_2d_encoder else ""
    print(f"{info.name}: {info.description}\nneeds {needs}{encoder}")
    for option in info.options:
        published = {AS_PUBLISHED: " (as published)", NOT_PUBLISHED: ""}.get(
            option.published, f" (published: {option.published})"
        )
        print(f"  method.{option.name} = {option.default!r}{published}: {option.help}")


if __name__ == "__main__":
    sys.exit(main())
