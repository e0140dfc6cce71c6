"""CI installs every test extra, so tests that skip without an optional package never skip there."""

import importlib
import os

import pytest

# Optional packages some tests need; a machine without them (e.g. a GPU box with a fixed
# environment) skips those tests, but CI must not.
OPTIONAL_FOR_TESTS = ("pyarrow", "onnx", "onnxruntime", "onnxscript", "ray")


@pytest.mark.skipif(not os.environ.get("CI"), reason="checks CI's environment (CI=true)")
@pytest.mark.parametrize("name", OPTIONAL_FOR_TESTS)
def test_ci_has_every_test_extra(name):
    importlib.import_module(name)
