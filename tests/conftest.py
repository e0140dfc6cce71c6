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
    return Moon3Config.from_name("moon3-tiny")


# MOON3RT_TEST_TIMEOUT_S=N fails any test still running after N seconds (bench/gpu_check.sh sets
# it, so one hung or slow test cannot take the rest of a short GPU run with it). SIGALRM is
# delivered between Python bytecodes: a test stuck inside one C call is caught when it returns.
_TEST_TIMEOUT_S = int(os.environ.get("MOON3RT_TEST_TIMEOUT_S", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import signal

    if _TEST_TIMEOUT_S <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past MOON3RT_TEST_TIMEOUT_S={_TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(_TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
