"""CPU hot paths of preprocessing, timed with pytest-benchmark (benchmarks, not tests: nothing
about their speed is asserted). They live outside tests/, so only an explicit run times them:

    python -m pytest bench/test_preprocess_benchmark.py --benchmark-only

Inputs are the standard workload's (bench/workload.py): 448x448 product photos, which the
moon3-2b limits turn into 1024 patches / 256 merged tokens, and ~32-token titles.
"""

from __future__ import annotations

import pytest

import workload  # bench/ is on sys.path: pytest puts a test file's folder there

from moon3rt.api import TINY_TOKENIZER
from moon3rt.batching import pack
from moon3rt.config import Moon3Config
from moon3rt.images import load_image, preprocess_image
from moon3rt.prompt import PromptBuilder, load_tokenizer

SIZE = 448
BATCH = 64


@pytest.fixture(scope="module")
def cfg() -> Moon3Config:
    return Moon3Config.from_name("moon3-2b")


@pytest.fixture(scope="module")
def builder(cfg) -> PromptBuilder:
    return PromptBuilder(cfg, load_tokenizer(TINY_TOKENIZER))


@pytest.fixture(scope="module")
def photo():
    return workload.product_image(0, SIZE)


@pytest.fixture(scope="module", params=["JPEG", "PNG"])
def encoded(request, photo) -> bytes:
    return workload.encode_image(photo, request.param)


@pytest.fixture(scope="module")
def patchified(cfg, photo):
    return _preprocess(cfg, photo)


@pytest.fixture(scope="module")
def title(builder) -> str:
    return workload.product_title(0, builder.tokenizer, 32)


def _preprocess(cfg: Moon3Config, image):
    v = cfg.vision
    return preprocess_image(image, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=v.patch_size,
                            merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)


def test_load_image(benchmark, encoded, cfg):
    """Decode (JPEG or PNG bytes) to an RGB PIL image."""
    image = benchmark(load_image, encoded, target_pixels=cfg.max_pixels)
    assert image.size == (SIZE, SIZE)


def test_preprocess_image(benchmark, photo, cfg):
    """Smart resize, normalise and patchify one 448x448 image (1024 patches)."""
    out = benchmark(_preprocess, cfg, photo)
    assert out.grid_thw == (1, SIZE // 14, SIZE // 14)


def test_prompt_build(benchmark, builder, patchified, title):
    """Chat template, tokenisation and M-RoPE positions for one image + title."""
    item = benchmark(builder.build, title, [patchified])
    assert item.num_patches == (SIZE // 14) ** 2


def test_prepare_item(benchmark, builder, encoded, cfg, title):
    """Everything `Encoder.prepare` does for one item: decode, preprocess, prompt."""

    def prepare():
        return builder.build(title, [_preprocess(cfg, load_image(encoded, target_pixels=cfg.max_pixels))])

    benchmark(prepare)


def test_pack(benchmark, builder, patchified, title, cfg):
    """Pack a batch of 64 prepared items (concatenation of ~1024 x 1176 float32 patches each)."""
    items = [builder.build(title, [patchified]) for _ in range(BATCH)]
    batch = benchmark(pack, items, cfg.vision.spatial_merge_size)
    assert batch.num_items == BATCH
