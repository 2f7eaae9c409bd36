"""Hooks into the training loop: what a script watches or measures without patching the loop.

A ``TrainingCallback`` is told when training starts (the method built and restored, the patch
source open), when each iteration starts, when its patches are drawn, when its step is done
and when training ends (the outputs written). Subclass it and override what you need; a plain
function ``(iterations done, method, step result)`` stands for ``on_step`` alone. Modelled on
the callback objects of PyTorch Lightning and Keras, trimmed to the phases of ``training``.

Callbacks run on the main process only. They must not draw from the global random streams
(training would then differ from a run without them), and one that changes a network's mode
must restore it.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

from SemiSupSegLib.backend.methods import Method
from SemiSupSegLib.backend.methods.base import StepResult

#: Called after each iteration: (iterations done, method, the step's result).
StepCallback = Callable[[int, Method, StepResult], None]


class TrainingCallback:
    """The hooks of a training, each a no-op here."""

    def on_start(self, method: Method, start: int, total: int) -> None:
        """Before the first iteration: ``start`` iterations done (a resume), of ``total``."""

    def on_iteration_start(self, iteration: int) -> None:
        """Before iteration ``iteration`` (from 0) draws its patches."""

    def on_batch_ready(self, iteration: int) -> None:
        """Once iteration ``iteration``'s patches are drawn, before its training step."""

    def on_step(self, done: int, method: Method, result: StepResult) -> None:
        """After a step: ``done`` iterations done; the networks are in training mode."""

    def on_end(self, method: Method) -> None:
        """After the last iteration, once the checkpoint and the model file are written."""


class _StepFunction(TrainingCallback):
    def __init__(self, function: StepCallback) -> None:
        self.function = function

    def on_step(self, done: int, method: Method, result: StepResult) -> None:
        self.function(done, method, result)


class CallbackList(TrainingCallback):
    """Several callbacks called in order, as one."""

    def __init__(self, callbacks: Sequence[Union[TrainingCallback, StepCallback]] = ()) -> None:
        self.callbacks = [
            c if isinstance(c, TrainingCallback) else _StepFunction(c) for c in callbacks
        ]

    def on_start(self, method: Method, start: int, total: int) -> None:
        for callback in self.callbacks:
            callback.on_start(method, start, total)

    def on_iteration_start(self, iteration: int) -> None:
        for callback in self.callbacks:
            callback.on_iteration_start(iteration)

    def on_batch_ready(self, iteration: int) -> None:
        for callback in self.callbacks:
            callback.on_batch_ready(iteration)

    def on_step(self, done: int, method: Method, result: StepResult) -> None:
        for callback in self.callbacks:
            callback.on_step(done, method, result)

    def on_end(self, method: Method) -> None:
        for callback in self.callbacks:
            callback.on_end(method)
