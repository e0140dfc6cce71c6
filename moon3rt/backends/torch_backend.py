"""The reference backend: the plain-PyTorch model of `moon3rt.model`, eager."""

from __future__ import annotations

import torch

from ..model import Moon3Model, PackedBatch


class TorchBackend:
    name = "torch"

    def __init__(self, model: Moon3Model, device: torch.device):
        self.model = model
        self.device = device

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch.to(self.device, non_blocking=True)).float()
