"""Training patches streamed from disk.

Volumes are read when a patch is first drawn from them and kept, prepared, in an LRU cache
bounded in count (``cache_volumes``) and in bytes (a share of the memory available when the
stream starts), so memory does not grow with the number of volumes. Each stream is an endless
``IterableDataset`` of single patches. Drawing overlaps compute either in a background thread
per stream that keeps ``prefetch`` patches ready (``num_workers`` = 0, the default) or in
``DataLoader`` worker processes (``num_workers`` > 0).

Drawn in this process (``num_workers`` = 0), each patch carries the state of its stream's random
generators after it was drawn; ``BatchSource.state_dict`` keeps that of the last patch used, so
a resumed training continues the very stream an uninterrupted one would have drawn.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from SemiSupSegLib.backend.checkpoint import random_state_from_list, random_state_to_list
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Case
from SemiSupSegLib.backend.preprocessing import (
    PreparedVolume,
    labeled_transforms,
    prepare_volume,
    unlabeled_transforms,
)
from SemiSupSegLib.backend.volumes import read_image

#: Share of the memory available when a stream starts that its volume cache may hold.
CACHE_MEMORY_SHARE = 0.25
#: The key under which a patch drawn in this process carries its stream's state.
STREAM_STATE = "stream_state"


@dataclass
class CachedVolume:
    """What a patch is cut from: the prepared (1, z, y, x) image and label arrays only (the
    SimpleITK images that prediction needs for geometry would double the memory per entry)."""

    image: np.ndarray
    label: Optional[np.ndarray]

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (0 if self.label is None else self.label.nbytes)


class VolumeCache:
    """Least-recently-used cache of prepared volumes: at most ``capacity`` of them and at most
    ``max_bytes`` of arrays (no byte limit when None). Counts hits and misses."""

    def __init__(self, config: TrainConfig, capacity: int, max_bytes: Optional[int] = None) -> None:
        self.config = config
        self.capacity = max(0, int(capacity))
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, CachedVolume] = OrderedDict()

    def get(self, case: Case) -> CachedVolume:
        if case.name in self._items:
            self.hits += 1
            self._items.move_to_end(case.name)
            return self._items[case.name]
        self.misses += 1
        prepared = load_case(case, self.config)
        volume = CachedVolume(prepared.image, prepared.label)
        if self.capacity:
            self._items[case.name] = volume
            self.nbytes += volume.nbytes
            while len(self._items) > self.capacity or (
                self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._items) > 1
            ):
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes
        return volume

    def __len__(self) -> int:
        return len(self._items)


def available_memory() -> Optional[int]:
    """Bytes of physical memory available now, or None where the platform does not say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional; fall back to sysconf
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def load_case(case: Case, config: TrainConfig) -> PreparedVolume:
    """Read a case from disk and prepare it with the run's modality and spacing settings."""
    image = read_image(case.image)
    label = read_image(case.label) if case.label is not None else None
    return prepare_volume(
        case.name,
        image,
        label,
        config.modality,
        config.target_spacing,
        config.ct_window,
        config.ct_foreground_stats,
    )


class PatchStream(IterableDataset):
    """Endless random patches from ``cases``: image and label when ``labeled``, else image.

    The order of patches depends only on ``seed`` (and the worker's index in a DataLoader),
    not on when or in which thread they are drawn. Outside a DataLoader worker, each patch
    carries under ``STREAM_STATE`` the generators' state after it, and ``start_state`` (such a
    state) continues the stream from there.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        config: TrainConfig,
        labeled: bool,
        seed: int,
        weights: Optional[Sequence[float]] = None,
        start_state: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not cases:
            raise ValueError("a patch stream needs at least one case")
        self.cases = list(cases)
        self.probabilities = None if weights is None else _probabilities(weights, len(cases))
        self.config = config
        self.labeled = labeled
        self.seed = seed
        self.start_state = start_state
        self.cache: Optional[VolumeCache] = None  # the last iterator's, for reports

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, worker, int(self.labeled)])
        transform = (
            labeled_transforms(self.config) if self.labeled else unlabeled_transforms(self.config)
        )
        transform.set_random_state(seed=int(rng.integers(2**31)))
        generators = _random_generators(transform)
        if info is None and self.start_state is not None:
            rng.bit_generator.state = self.start_state["generator"]
            for generator, state in zip(generators, self.start_state["transforms"]):
                generator.set_state(random_state_from_list(state))
        workers = 1 if info is None else info.num_workers
        available = available_memory()
        budget = None if available is None else int(CACHE_MEMORY_SHARE * available / 2 / workers)
        cache = VolumeCache(self.config, max(1, self.config.cache_volumes // workers), budget)
        self.cache = cache
        while True:
            if self.probabilities is None:
                case = self.cases[int(rng.integers(len(self.cases)))]
            else:
                case = self.cases[int(rng.choice(len(self.cases), p=self.probabilities))]
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
            if info is None:
                out[STREAM_STATE] = {
                    "generator": rng.bit_generator.state,
                    "transforms": [random_state_to_list(g.get_state()) for g in generators],
                }
            yield out


def _random_generators(transform: Any) -> List[np.random.RandomState]:
    """Every random generator inside a MONAI transform (a Compose, the dictionary transforms
    in it and the array transforms they wrap), in a fixed order."""
    found: List[np.random.RandomState] = []
    seen = set()
    pending = [transform]
    while pending:
        item = pending.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Randomizable) and all(item.R is not g for g in found):
            found.append(item.R)
        for value in getattr(item, "__dict__", {}).values():
            values = value if isinstance(value, (list, tuple)) else [value]
            pending.extend(v for v in values if isinstance(v, (Transform, Randomizable)))
    return found


def _probabilities(weights: Sequence[float], count: int) -> np.ndarray:
    """Per-case weights as sampling probabilities (non-negative, not all zero)."""
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (count,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"case weights must be {count} non-negative numbers, not all zero")
    return p / p.sum()


class _Failure:
    """An exception raised while drawing, handed to the consumer in place of an item."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _produce(iterator: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in iterator:
            if stop.is_set():
                return
            out.put(item)  # blocks while the queue is full; close() drains it
            if stop.is_set():
                return
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
        if not stop.is_set():
            out.put(_Failure(error))


def _shutdown(out: queue.Queue, stop: threading.Event) -> None:
    stop.set()
    try:
        while True:
            out.get_nowait()
    except queue.Empty:
        pass


class Prefetcher:
    """Draws from ``iterator`` in one background thread, keeping up to ``depth`` items ready.

    A single producer keeps the items in the iterator's order, so a seeded stream yields the
    same items with or without prefetching; the thread only moves the drawing into the time
    the caller spends computing. An exception in the producer is raised by ``next``. The
    thread is a daemon and stops on ``close()`` or when the prefetcher is garbage-collected,
    so neither a finished nor a cancelled run waits for it.
    """

    def __init__(self, iterator: Iterator, depth: int, name: str = "prefetch") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._failure: Optional[_Failure] = None
        self._thread = threading.Thread(
            target=_produce, args=(iterator, self._queue, self._stop), name=name, daemon=True
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, self._stop)
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._failure is None:
            if self._stop.is_set():
                raise StopIteration
            item = self._queue.get()
            if not isinstance(item, _Failure):
                return item
            self._failure = item
        raise self._failure.error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer and wait (at most ``timeout`` s) for it to finish its item."""
        self._finalizer()
        self._thread.join(timeout)


class BatchSource:
    """Draws any number of labeled and unlabeled patches per iteration and stacks them."""

    def __init__(
        self,
        labeled: Sequence[Case],
        unlabeled: Sequence[Case],
        config: TrainConfig,
        seed: int,
        labeled_weights: Optional[Sequence[float]] = None,
        state: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``labeled_weights``: relative chance of each labeled case (None: all equal);
        ``state``: a ``state_dict`` to continue from (None: start afresh from ``seed``)."""
        state = state or {}
        self.streams: List[PatchStream] = [
            PatchStream(labeled, config, True, seed, labeled_weights, state.get("labeled"))
        ]
        self._labeled = _endless(self.streams[0], config)
        self._unlabeled: Optional[Iterator] = None
        if unlabeled:
            self.streams.append(
                PatchStream(unlabeled, config, False, seed + 1, None, state.get("unlabeled"))
            )
            self._unlabeled = _endless(self.streams[1], config)
        self._state: Dict[str, Any] = dict(state)
        self._tracked = config.num_workers <= 0

    @property
    def has_unlabeled(self) -> bool:
        return self._unlabeled is not None

    def labeled(self, count: int) -> Dict[str, torch.Tensor]:
        return self._take(self._labeled, count, "labeled")

    def unlabeled(self, count: int) -> Dict[str, torch.Tensor]:
        if self._unlabeled is None:
            raise RuntimeError("this run has no unlabeled images")
        return self._take(self._unlabeled, count, "unlabeled")

    def _take(self, stream: Iterator, count: int, kind: str) -> Dict[str, torch.Tensor]:
        items = [next(stream) for _ in range(count)]
        for item in items:
            self._state[kind] = item.pop(STREAM_STATE, None)
        return _stack(items)

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """Where the streams stand after the patches used so far (plain values), or None when
        worker processes draw them (their streams are not tracked)."""
        return dict(self._state) if self._tracked else None

    def close(self) -> None:
        """Stop background drawing (prefetch threads); worker processes end with the source."""
        for stream in (self._labeled, self._unlabeled):
            if isinstance(stream, Prefetcher):
                stream.close()

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _endless(stream: PatchStream, config: TrainConfig) -> Iterator:
    if config.num_workers <= 0:
        if config.prefetch <= 0:
            return iter(stream)
        kind = "labeled" if stream.labeled else "unlabeled"
        return Prefetcher(iter(stream), config.prefetch, name=f"prefetch-{kind}-patches")
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=True,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def _stack(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if not items:
        return {}
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
