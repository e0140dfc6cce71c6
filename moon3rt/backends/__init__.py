"""Backends: one `embed(batch) -> (B, output_dim)` interface, chosen by name in `moon3rt.load`."""

from __future__ import annotations

from typing import Protocol

import torch

from ..model import Moon3Model, PackedBatch

BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt")


class Backend(Protocol):
    name: str
    device: torch.device

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Un-normalised output vectors (B, output_dim), float32, for a packed batch."""
        ...


def create_backend(name: str, model: Moon3Model, device: torch.device) -> Backend:
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(model, device)
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(model, device)
    if name == "onnxruntime":  # needs the `onnx` extra; imported only when asked for
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, device)
    if name == "tensorrt":  # needs CUDA and TensorRT (or TensorRT-RTX); imported only when asked for
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, device)
    raise ValueError(f"unknown backend {name!r}; available backends: {list(BACKENDS)}")
