"""Supervised training on the labeled cases only: the baseline every method must beat."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.methods.base import (
    Method,
    StepResult,
    register_method,
    segmentation_loss,
)
from SemiSupSegLib.backend.networks import SegmentationNetwork


@register_method("supervised")
class SupervisedMethod(Method):
    """One 3D network, Dice + cross-entropy, AdamW with warm-up and cosine decay."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__(config, num_classes, device)
        self.network = self.build_network()
        self.optimizer, self.schedule = self.build_optimizer(self.network)
        self.loss = segmentation_loss()

    def train_step(
        self,
        labeled: Dict[str, torch.Tensor],
        unlabeled: Optional[Dict[str, torch.Tensor]],
        iteration: int,
    ) -> StepResult:
        self.network.train()
        image = labeled["image"].to(self.device, non_blocking=True)
        label = labeled["label"].to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.loss(self.synced(self.network)(image), label)
        self.optimise(loss, self.optimizer, self.schedule)
        return StepResult({"loss": float(loss.detach())}, {"lr": self.schedule.get_last_lr()[0]})

    def deploy_network(self) -> SegmentationNetwork:
        return self.network

    def stateful(self) -> Dict[str, Any]:
        return {
            "network": self.network,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "scaler": self.scaler,
        }
