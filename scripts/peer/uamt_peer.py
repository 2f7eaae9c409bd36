#!/usr/bin/env python3
"""Run UA-MT's own code (Yu et al., MICCAI 2019, github.com/yulequan/UA-MT) on our Left Atrium
split, from a scratch folder outside this repository, for ``scripts/peer_benchmark.py``.

Nothing of the peer is committed here: ``prepare`` copies the peer's ``code/`` folder and its
h5 files out of a clone into the scratch folder and applies only the changes the benchmark
allows (issue 15), each a pattern that must match, and writes what it changed to
``CHANGES.diff`` there:

- device: no ``.cuda()``, no data-loader workers or pinned memory (a CPU machine);
- split: ``train.list`` is ours (the 8 or 16 labeled cases first, as the papers take them,
  then the unlabeled ones; the validation cases in neither list) and ``test.list`` our 20
  test cases; the labeled count becomes ``--labeled_num`` (the peer hard-codes 16);
- iterations: the peer's own ``--max_iterations``;
- patch size, where CPU time requires it: a ``--patch_size`` argument (the peer hard-codes
  112x112x80) for training, its Monte Carlo buffers and the sliding-window test.

Network, losses, augmentation, optimiser, schedule, EMA, consistency ramp and the test's
strides and metrics are the peer's. ``train`` runs a training script and records its CPU
time; ``test`` runs the peer's ``test_single_case`` and ``calculate_metric_percase`` on
every test case (inside ``torch.no_grad``, which changes no number) and writes the RESULT.json
``scripts/peer_benchmark.py add`` reads. The peer's extra packages (``PEER_PACKAGES``) go
into ``SCRATCH/pylib``, not into the project's environment.

    python scripts/peer/uamt_peer.py prepare --source UA-MT/.git --scratch ../scratch/uamt
    python scripts/peer/uamt_peer.py train --scratch ../scratch/uamt --script supervised \\
        --name vnet-L8 --labels 8 --iterations 1500 --patch 64 64 48
    python scripts/peer/uamt_peer.py test --scratch ../scratch/uamt --name vnet-L8
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from convert_left_atrium import CASES_FOLDER, H5_NAME, source_reader  # noqa: E402

#: The h5 cases in the scratch folder, laid out as in the peer's repository.
CASES = f"data/{CASES_FOLDER}"
SCRIPTS = {
    "supervised": "train_LA.py",
    "uamt": "train_LA_meanteacher_certainty.py",
}
#: What the peer imports that the project's environment lacks, installed without their
#: dependencies so that none shadows the project's own numpy or torch helpers.
PEER_PACKAGES = ["tensorboardX", "medpy", "nibabel", "protobuf"]
PATCH_ARGUMENT = (
    "parser.add_argument('--patch_size', type=int, nargs=3, default=[112, 112, 80])\n"
    "parser.add_argument('--labeled_num', type=int, default=16)\n"
)


def git_show(source: Path, path: str) -> bytes:
    """A file of the peer's code from the clone's git directory."""
    return subprocess.run(
        ["git", f"--git-dir={source}", "show", f"HEAD:{path}"], check=True, capture_output=True
    ).stdout


def substitute(text: str, pattern: str, replacement: str, name: str, count: int = 0) -> str:
    """``re.subn`` that must match (``count`` times when given): a peer that changed upstream
    stops the preparation instead of running half-changed."""
    changed, matched = re.subn(pattern, replacement, text)
    if matched == 0 or (count and matched != count):
        raise SystemExit(f"{name}: pattern {pattern!r} matched {matched} times")
    return changed


def allowed_changes(name: str, text: str) -> str:
    """The benchmark's permitted changes to one peer file (see the module docstring)."""
    text = text.replace(".cuda()", "")
    text = re.sub(r"num_workers=\d+", "num_workers=0", text)
    text = text.replace("pin_memory=True", "pin_memory=False")
    if name in SCRIPTS.values():
        text = substitute(
            text, r"(parser\.add_argument\('--gpu'[^\n]*\n)", r"\1" + PATCH_ARGUMENT, name, 1
        )
        text = substitute(
            text, r"patch_size = \(112, 112, 80\)", "patch_size = tuple(args.patch_size)", name, 1
        )
        text = text.replace("2, 112, 112, 80]", "2, *patch_size]")
        text = text.replace("2, 112, 112, 80)", "2, *patch_size)")
    if name == "train_LA.py":
        text = substitute(text, r"num=16", "num=args.labeled_num", name, 1)
    if name == "train_LA_meanteacher_certainty.py":
        text = substitute(text, r"list\(range\(16\)\)", "list(range(args.labeled_num))", name, 1)
        text = substitute(
            text,
            r"list\(range\(16, 80\)\)",
            "list(range(args.labeled_num, len(db_train)))",
            name,
            1,
        )
    return text


def prepare(args: argparse.Namespace) -> None:
    from benchmark import dataset_split

    source, scratch = Path(args.source), Path(args.scratch)
    listing = subprocess.run(
        ["git", f"--git-dir={source}", "ls-tree", "-r", "--name-only", "HEAD", "code/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    diff = []
    for path in listing:
        if not path.endswith(".py"):
            continue
        original = git_show(source, path).decode()
        changed = allowed_changes(Path(path).name, original)
        target = scratch / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(changed)
        diff += difflib.unified_diff(
            original.splitlines(True), changed.splitlines(True), f"a/{path}", f"b/{path}"
        )
    (scratch / "CHANGES.diff").write_text("".join(diff))

    split = dataset_split("la", Path(args.data), hold_validation=True)
    labeled = split.labeled(args.max_labels)
    train = labeled + [c for c in split.train if c not in set(labeled)]
    (scratch / "data").mkdir(exist_ok=True)
    (scratch / "data" / "train.list").write_text("\n".join(train) + "\n")
    (scratch / "data" / "test.list").write_text("\n".join(split.test) + "\n")
    read = source_reader(source)
    for case in train + split.test:
        h5 = scratch / CASES / case / H5_NAME
        if not h5.exists():
            h5.parent.mkdir(parents=True, exist_ok=True)
            h5.write_bytes(read(f"{CASES_FOLDER}/{case}/{H5_NAME}"))
    lib = scratch / "pylib"
    if not lib.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(lib)]
            + PEER_PACKAGES,
            check=True,
        )
    print(
        f"prepared {scratch}: {len(train)} training cases ({args.max_labels} labeled first), "
        f"{len(split.test)} test cases; changes in {scratch / 'CHANGES.diff'}"
    )


def peer_environment(scratch: Path, threads: int) -> dict:
    path = os.pathsep.join([str(scratch / "pylib"), str(scratch / "code")])
    return dict(
        os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )


def train(args: argparse.Namespace) -> None:
    scratch = Path(args.scratch)
    if (scratch / "model" / args.name).exists():
        raise SystemExit(f"{scratch / 'model' / args.name} exists: another --name, or remove it")
    command = [
        sys.executable,
        SCRIPTS[args.script],
        "--exp",
        args.name,
        "--max_iterations",
        str(args.iterations),
        "--labeled_num",
        str(args.labels),
        "--patch_size",
        *map(str, args.patch),
        *args.extra,
    ]
    before = os.times()
    started = time.time()
    subprocess.run(
        command, cwd=scratch / "code", env=peer_environment(scratch, args.threads), check=True
    )
    after = os.times()
    record = {
        "command": command,
        "cpu_s": round(
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system,
            1,
        ),
        "wall_s": round(time.time() - started, 1),
        "threads": args.threads,
        "script": args.script,
        "labels": args.labels,
        "iterations": args.iterations,
        "train_patch_size": list(args.patch),
        "extra_train_args": args.extra,
    }
    (scratch / "model" / args.name / "train_time.json").write_text(json.dumps(record, indent=1))
    print(f"trained {args.name}: {record['cpu_s'] / 3600:.2f} CPU-h")


def checkpoint(folder: Path, record: dict) -> Path:
    """The peer's final checkpoint of the training ``record`` describes: the supervised script
    saves ``iter_<N+1>`` (it stops after N+1 iterations), UA-MT ``iter_<N>``."""
    final = record["iterations"] + (1 if record["script"] == "supervised" else 0)
    weights = folder / f"iter_{final}.pth"
    if not weights.exists():
        raise SystemExit(f"{weights}: no final checkpoint of the {record['script']} training")
    return weights


def test(args: argparse.Namespace) -> None:
    scratch = Path(args.scratch)
    sys.path[:0] = [str(scratch / "code")]
    sys.path.append(str(scratch / "pylib"))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import h5py
    import torch
    from networks.vnet import VNet
    from test_util import calculate_metric_percase, test_single_case

    torch.set_num_threads(args.threads)
    folder = scratch / "model" / args.name
    train_record = json.loads((folder / "train_time.json").read_text())
    patch = tuple(train_record["train_patch_size"])  # the peer tests at its training patch
    weights = checkpoint(folder, train_record)
    net = VNet(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=False)
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    net.eval()
    cases = (scratch / "data" / "test.list").read_text().split()
    per_case = []
    before, started = time.process_time(), time.time()
    for number, case in enumerate(cases, 1):
        with h5py.File(scratch / CASES / case / H5_NAME, "r") as h5:
            image, label = h5["image"][:], h5["label"][:]
        with torch.no_grad():
            prediction, _ = test_single_case(net, image, 18, 4, patch, num_classes=2)
        scores = (
            (0, 0, 0, 0) if prediction.sum() == 0 else calculate_metric_percase(prediction, label)
        )
        per_case.append(
            dict(zip(("id", "dice", "jaccard", "hd95", "asd"), (case, *map(float, scores))))
        )
        print(f"{number}/{len(cases)} {case} Dice {per_case[-1]['dice']:.4f}", flush=True)
    result = {
        "name": args.name,
        "script": train_record["script"],
        "labels": train_record["labels"],
        "mean": {
            m: sum(c[m] for c in per_case) / len(per_case)
            for m in ("dice", "jaccard", "hd95", "asd")
        },
        "per_case": per_case,
        "meta": {
            "iterations": train_record["iterations"],
            "checkpoint": weights.name,
            "train_patch_size": train_record["train_patch_size"],
            "test_patch_size": list(patch),
            "extra_train_args": train_record["extra_train_args"],
            "train_command": train_record["command"],
        },
        "train_time": {"cpu_s": train_record["cpu_s"], "wall_s": train_record["wall_s"]},
        "test_time": {
            "cpu_s": round(time.process_time() - before, 1),
            "wall_s": round(time.time() - started, 1),
        },
    }
    out = Path(args.out or scratch / "results" / f"{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"mean Dice {result['mean']['dice']:.4f}; wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--source", required=True, help="the git directory (or clone) of yulequan/UA-MT")
    p.add_argument("--scratch", required=True, help="a folder outside this repository")
    p.add_argument(
        "--data",
        default=str(ROOT.parent / "data" / "LA"),
        help="our converted LA folder (for the split)",
    )
    p.add_argument(
        "--max-labels", type=int, default=16, help="labeled cases put first in train.list"
    )
    for name in ("train", "test"):
        p = commands.add_parser(name)
        p.add_argument("--scratch", required=True)
        p.add_argument("--name", required=True, help="the run's folder under SCRATCH/model")
        p.add_argument("--threads", type=int, default=1)
    p = commands.choices["train"]
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80], help="training and test")
    p.add_argument("--script", choices=sorted(SCRIPTS), required=True)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("extra", nargs="*", help="further arguments for the peer's script (after --)")
    commands.choices["test"].add_argument("--out", help="default: SCRATCH/results/NAME.json")
    args = parser.parse_args()
    {"prepare": prepare, "train": train, "test": test}[args.command](args)


if __name__ == "__main__":
    main()
