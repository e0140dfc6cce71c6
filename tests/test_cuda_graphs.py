"""CUDA graph buckets and cache of the triton backend (moon3rt/backends/cuda_graphs.py).

What needs no GPU is checked here: bucket selection, padding bookkeeping and the cache's
policy (capture on the second sighting, LRU bound, fallbacks) with a stand-in capture that
replays eagerly. tests/test_triton_backend.py checks that a padded forward equals the
unpadded one; the real capture and replay are the gpu-marked tests.
"""

import pytest
import torch

from moon3rt.backends.cuda_graphs import (
    Bucket,
    BucketLimits,
    ForwardInputs,
    GraphCache,
    allocate_inputs,
    bucket_for,
    pad_inputs,
)


def _inputs(lengths, images=()):
    """A ForwardInputs on the CPU: items of `lengths` tokens, images of the given patch counts."""
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = ForwardInputs(torch.arange(1, t + 1), torch.arange(t).repeat(3, 1), cu, max(lengths))
    if images:
        p = sum(images)
        inputs.pixel_values = torch.randn(p, 6)
        inputs.vision_positions = torch.ones(p, 2, dtype=torch.int64)
        inputs.vision_cu = torch.tensor([0, *torch.tensor(images).cumsum(0).tolist()], dtype=torch.int32)
        inputs.vision_max_len = max(images)
        inputs.image_rows = torch.arange(p // 4)
    return inputs


def test_bucket_rounds_up_and_keeps_a_padding_row():
    b = bucket_for(_inputs([300, 290, 5], images=[1024, 1024, 64]))
    assert b == Bucket(items=4, tokens=768, max_len=384, images=4, patches=3072, vision_max_len=1024)
    # exactly a multiple of the token step still gets a padding row
    assert bucket_for(_inputs([256])).tokens == 512
    text_only = bucket_for(_inputs([3]))
    assert (text_only.images, text_only.patches, text_only.vision_max_len) == (0, 0, 0)
    # the same bucket for nearby shapes: that is what makes a graph reusable
    assert bucket_for(_inputs([300, 280])) == bucket_for(_inputs([290, 299]))


def test_shapes_outside_the_limits_have_no_bucket():
    limits = BucketLimits(max_items=4, max_tokens=1024)
    assert bucket_for(_inputs([10] * 5), limits) is None
    assert bucket_for(_inputs([1100]), limits) is None
    assert bucket_for(_inputs([10] * 4), limits) is not None


def test_padding_makes_empty_segments_and_sends_padding_tokens_to_the_padding_row():
    inputs = _inputs([5, 3], images=[8, 4])
    bucket = bucket_for(inputs, BucketLimits(token_step=16, patch_step=16, len_step=8))
    static = pad_inputs(allocate_inputs(bucket, inputs), inputs)
    assert static.cu_seqlens.tolist() == [0, 5, 8]  # 2 items: a power of two already
    assert static.tokens == 16 and torch.equal(static.input_ids[:8], inputs.input_ids)
    assert static.input_ids[8:].eq(0).all() and static.position_ids[:, 8:].eq(0).all()
    assert static.vision_cu.tolist() == [0, 8, 12]
    assert static.pixel_values.shape[0] == 16 and static.pixel_values[12:].eq(0).all()
    assert static.image_rows.tolist() == [0, 1, 2, 15]  # 3 real merged tokens, 1 of padding -> last row
    # a smaller batch reuses the buffers: stale entries are overwritten, not left behind
    small = _inputs([2], images=[4])
    pad_inputs(static, small)
    assert static.cu_seqlens.tolist() == [0, 2, 2]
    assert static.vision_cu.tolist() == [0, 4, 4]
    assert static.image_rows.tolist() == [0, 15, 15, 15]
    assert static.input_ids[2:].eq(0).all()


class _Recorder:
    """A stand-in for cuda_graph_capture: remembers each capture and replays eagerly."""

    def __init__(self, fail=False):
        self.captured, self.fail = [], fail

    def __call__(self, forward, static, pool):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(static.tokens)
        return lambda: forward(static)


def _forward(inputs):
    h = inputs.input_ids.float()[:, None] * 2
    v = None if inputs.pixel_values is None else inputs.pixel_values[::4] + 1
    return h, v


def test_cache_captures_on_second_sighting_and_replays_padded():
    capture = _Recorder()
    cache = GraphCache(_forward, capture=capture)
    inputs = _inputs([5, 7], images=[8])
    assert cache.run(inputs) is None  # first sighting: eager (and Triton compiles)
    h, v = cache.run(inputs)
    assert capture.captured == [256]
    expected_h, expected_v = _forward(inputs)
    assert torch.equal(h, expected_h) and torch.equal(v, expected_v)
    h, _ = cache.run(_inputs([6, 6], images=[8]))  # same bucket: replayed, no new capture
    assert capture.captured == [256] and cache.stats["replays"] == 2 and h.shape[0] == 12


def test_cache_is_bounded_least_recently_used_first():
    capture = _Recorder()
    cache = GraphCache(_forward, max_graphs=2, min_uses=1, capture=capture)
    a, b, c = _inputs([10]), _inputs([300]), _inputs([600])
    for x in (a, b, a, c):  # c evicts b (a was used more recently)
        assert cache.run(x) is not None
    assert len(cache.graphs) == 2 and cache.stats["evictions"] == 1
    assert bucket_for(b) not in cache.graphs and bucket_for(a) in cache.graphs


def test_failed_capture_and_large_shapes_run_eagerly():
    cache = GraphCache(_forward, min_uses=1, capture=_Recorder(fail=True))
    x = _inputs([10])
    assert cache.run(x) is None and bucket_for(x) in cache.failed
    assert cache.run(x) is None  # not retried
    big = GraphCache(_forward, min_uses=1, capture=_Recorder(), limits=BucketLimits(max_tokens=256))
    assert big.run(_inputs([400])) is None and not big.graphs
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(_forward, max_graphs=0)
