"""Training patches streamed from disk.

Volumes are read when a patch is drawn from them and kept in a small LRU cache of bounded
size, so memory does not grow with the number of volumes. Each stream is an endless
``IterableDataset`` of single patches; a ``DataLoader`` with worker processes overlaps reading
and augmentation with compute when ``num_workers`` > 0.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Case
from SemiSupSegLib.backend.preprocessing import (
    PreparedVolume,
    labeled_transforms,
    prepare_volume,
    unlabeled_transforms,
)
from SemiSupSegLib.backend.volumes import read_image


class VolumeCache:
    """Least-recently-used cache of prepared volumes, at most ``capacity`` of them."""

    def __init__(self, config: TrainConfig, capacity: int) -> None:
        self.config = config
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, PreparedVolume] = OrderedDict()

    def get(self, case: Case) -> PreparedVolume:
        if case.name in self._items:
            self._items.move_to_end(case.name)
            return self._items[case.name]
        volume = load_case(case, self.config)
        if self.capacity:
            self._items[case.name] = volume
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return volume

    def __len__(self) -> int:
        return len(self._items)


def load_case(case: Case, config: TrainConfig) -> PreparedVolume:
    """Read a case from disk and prepare it with the run's modality and spacing settings."""
    image = read_image(case.image)
    label = read_image(case.label) if case.label is not None else None
    return prepare_volume(
        case.name, image, label, config.modality, config.target_spacing, config.ct_window
    )


class PatchStream(IterableDataset):
    """Endless random patches from ``cases``: image and label when ``labeled``, else image."""

    def __init__(
        self, cases: Sequence[Case], config: TrainConfig, labeled: bool, seed: int
    ) -> None:
        super().__init__()
        if not cases:
            raise ValueError("a patch stream needs at least one case")
        self.cases = list(cases)
        self.config = config
        self.labeled = labeled
        self.seed = seed

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, worker, int(self.labeled)])
        transform = (
            labeled_transforms(self.config) if self.labeled else unlabeled_transforms(self.config)
        )
        transform.set_random_state(seed=int(rng.integers(2**31)))
        workers = 1 if info is None else info.num_workers
        cache = VolumeCache(self.config, max(1, self.config.cache_volumes // workers))
        while True:
            case = self.cases[int(rng.integers(len(self.cases)))]
            volume = cache.get(case)
            item = {"image": volume.image}
            if self.labeled:
                item["label"] = volume.label
            patch = transform(item)
            if isinstance(patch, list):
                patch = patch[0]
            out = {"image": torch.as_tensor(patch["image"], dtype=torch.float32)}
            if self.labeled:
                out["label"] = torch.as_tensor(patch["label"]).to(torch.int64)
            yield out


class BatchSource:
    """Draws any number of labeled and unlabeled patches per iteration and stacks them."""

    def __init__(
        self,
        labeled: Sequence[Case],
        unlabeled: Sequence[Case],
        config: TrainConfig,
        seed: int,
    ) -> None:
        self._labeled = _endless(PatchStream(labeled, config, True, seed), config.num_workers)
        self._unlabeled: Optional[Iterator] = None
        if unlabeled:
            stream = PatchStream(unlabeled, config, False, seed + 1)
            self._unlabeled = _endless(stream, config.num_workers)

    @property
    def has_unlabeled(self) -> bool:
        return self._unlabeled is not None

    def labeled(self, count: int) -> Dict[str, torch.Tensor]:
        return _stack([next(self._labeled) for _ in range(count)])

    def unlabeled(self, count: int) -> Dict[str, torch.Tensor]:
        if self._unlabeled is None:
            raise RuntimeError("this run has no unlabeled images")
        return _stack([next(self._unlabeled) for _ in range(count)])


def _endless(stream: PatchStream, num_workers: int) -> Iterator:
    if num_workers <= 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=True,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def _stack(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if not items:
        return {}
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
