"""The onnxruntime backend's attention-cell budget per part: CPU and CUDA defaults, the environment."""

import contextlib

import onnxruntime
import pytest
import torch

from moon3rt.backends.onnxruntime_backend import CPU_MAX_CELLS, DEFAULT_MAX_CELLS, OnnxRuntimeBackend
from moon3rt.config import Moon3Config
from moon3rt.model import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(Moon3Config.from_name("moon3-tiny-random"))


def test_cpu_parts_are_smaller_than_cuda_parts(model, monkeypatch):
    monkeypatch.delenv("MOON3RT_ORT_MAX_CELLS", raising=False)
    assert OnnxRuntimeBackend(model, torch.device("cpu")).max_attention_cells == CPU_MAX_CELLS == 2**20
    no_cuda = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    with pytest.warns(UserWarning, match="no CUDAExecutionProvider") if no_cuda else contextlib.nullcontext():
        cuda = OnnxRuntimeBackend(model, torch.device("cuda"))
    assert cuda.max_attention_cells == DEFAULT_MAX_CELLS == 2**23


def test_environment_and_argument_set_the_budget(model, monkeypatch):
    monkeypatch.setenv("MOON3RT_ORT_MAX_CELLS", "4096")
    assert OnnxRuntimeBackend(model, torch.device("cpu")).max_attention_cells == 4096
    assert OnnxRuntimeBackend(model, torch.device("cpu"), max_attention_cells=77).max_attention_cells == 77
    with pytest.raises(ValueError, match="max_attention_cells must be positive"):
        OnnxRuntimeBackend(model, torch.device("cpu"), max_attention_cells=0)

