"""The fixed, seeded split of MSD Hippocampus that the demo and the benchmark share.

The labeled cases are sorted by name and shuffled with ``seed``; the last ``n_test`` are the
test cases (never used for training, not even as unlabeled images); the first 4, 8 and 16 of
the rest are the nested labeled subsets; the remaining training cases are unlabeled images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Sequence

import numpy as np


@dataclass(frozen=True)
class Split:
    """Training and test cases, and the validation cases held out of training to tune on."""

    train: List[str]
    test: List[str]
    validation: List[str] = field(default_factory=list)

    def labeled(self, count: int) -> List[str]:
        """The first ``count`` training cases; subsets are nested (4 within 8 within 16)."""
        if count > len(self.train):
            raise ValueError(f"only {len(self.train)} training cases, {count} asked for")
        return self.train[:count]

    def as_dict(self) -> Dict[str, List[str]]:
        return {
            "train": list(self.train),
            "test": list(self.test),
            "validation": list(self.validation),
        }

    def with_validation(self, count: int, keep_first: int = 16, seed: int = 0) -> Split:
        """Move ``count`` training cases, drawn with ``seed`` from those after the first
        ``keep_first`` (the nested labeled subsets), out of training into ``validation``:
        neither labeled nor unlabeled, they are what settings are tuned on."""
        pool = self.train[keep_first:]
        if count > len(pool):
            raise ValueError(f"only {len(pool)} cases after the first {keep_first} to draw from")
        drawn = [
            pool[i] for i in sorted(np.random.default_rng(seed).permutation(len(pool))[:count])
        ]
        held = set(drawn)
        return replace(self, train=[n for n in self.train if n not in held], validation=drawn)


def benchmark_split(case_names: Sequence[str], n_test: int = 40, seed: int = 0) -> Split:
    """Shuffle the sorted names with ``seed``; ``n_test`` test cases, the rest for training."""
    names = sorted(case_names)
    if n_test >= len(names):
        raise ValueError(f"{len(names)} cases cannot give {n_test} test cases and a training set")
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    return Split(train=shuffled[: len(names) - n_test], test=shuffled[len(names) - n_test :])
