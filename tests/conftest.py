"""Shared test set-up: Triton runs in its interpreter when there is no CUDA device."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moon3rt.config import Moon3Config  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_config() -> Moon3Config:
    return Moon3Config.from_name("moon3-tiny-random")
