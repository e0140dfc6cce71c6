"""CUDA graphs for the triton backend's forward: one graph per shape bucket, replayed with new inputs.

A moon3-2b forward is ~600 kernel launches (~310 of them Triton's, each 20-40 us of
Python in its launcher), so a single item's latency is bound by the host, not the GPU.
The forward (`TritonBackend.forward`) reads only device tensors and host ints fixed
before it starts, and never syncs, so it can be captured once and replayed:

- Shapes are rounded up to a `Bucket` (items, tokens, longest item, images, patches,
  longest image), and a batch is padded into its bucket (`pad_inputs`): extra items and
  images are empty segments; extra tokens and patches lie outside every segment, so
  attention never reads them and every other op is row-wise; the merged tokens of the
  padding patches are written to the last padding row, which always exists (a bucket has
  at least one more token than the batch). Real rows see exactly the computation of the
  unpadded forward; the attention grids are sized by the bucket's longest item and image.
- A bucket is captured the `min_uses`-th time it is seen (once warm: Triton compiles
  each kernel's specialisation for the padded shapes in a first eager run, outside the
  capture), kept in a bounded LRU cache (`max_graphs`), and replayed after copying the new
  inputs into its static buffers. All graphs share one memory pool: replays never
  overlap (one stream, outputs consumed before the next replay).
- Shapes outside every bucket (`BucketLimits`), buckets seen fewer times, and buckets
  whose capture failed run eagerly, unpadded: the path without graphs is unchanged.

The replayed outputs are views of the graph's static buffers, valid until the next
replay; the backend's heads consume them at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class ForwardInputs:
    """What the device part of a forward reads: tensors on the device, shape-like ints on the host."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (3, T) int64
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_len: int  # longest item, tokens
    pixel_values: torch.Tensor | None = None  # (P, ...) patches (see PackedBatch)
    vision_positions: torch.Tensor | None = None  # (P, 2) row/column of each patch
    vision_cu: torch.Tensor | None = None  # (I+1,) int32 patch offsets of the images
    vision_max_len: int = 0  # longest image, patches
    image_rows: torch.Tensor | None = None  # (P/4,) int64: the packed rows the merged image tokens replace
    pixel_norm: tuple | None = None  # (mean, std) of uint8 pixel_values

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def items(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def patches(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def images(self) -> int:
        return 0 if self.vision_cu is None else self.vision_cu.numel() - 1


@dataclass(frozen=True)
class Bucket:
    items: int
    tokens: int
    max_len: int
    images: int
    patches: int
    vision_max_len: int
    pixel_norm: tuple | None = None  # a graph bakes in its normalisation of uint8 pixels


@dataclass(frozen=True)
class BucketLimits:
    """Rounding steps and the largest shapes captured; larger batches run eagerly."""

    token_step: int = 256
    len_step: int = 128  # attention's row blocks are 64 or 128 tokens
    patch_step: int = 1024  # one 448 x 448 image; a multiple of 4 (the 2 x 2 merge window)
    max_items: int = 256
    max_tokens: int = 65536
    max_images: int = 256
    max_patches: int = 262144


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bucket_for(inputs: ForwardInputs, limits: BucketLimits = BucketLimits()) -> Bucket | None:
    """The bucket a batch is padded into, or None when it is larger than `limits` allows."""
    patches = inputs.patches
    bucket = Bucket(
        items=_power_of_two(max(1, inputs.items)),
        tokens=_round_up(inputs.tokens + 1, limits.token_step),  # + 1: the padding row always exists
        max_len=_round_up(max(1, inputs.max_len), limits.len_step),
        images=_power_of_two(inputs.images) if patches else 0,
        patches=_round_up(patches, limits.patch_step) if patches else 0,
        vision_max_len=_round_up(inputs.vision_max_len, limits.len_step) if patches else 0,
        pixel_norm=inputs.pixel_norm if patches else None,
    )
    if (bucket.items > limits.max_items or bucket.tokens > limits.max_tokens or bucket.images > limits.max_images
            or bucket.patches > limits.max_patches):
        return None
    return bucket


def _padded(x: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def allocate_inputs(bucket: Bucket, like: ForwardInputs) -> ForwardInputs:
    """Static input buffers of a bucket, with the dtypes and trailing dims of `like`."""
    has_images = bucket.patches > 0
    return ForwardInputs(
        input_ids=_padded(like.input_ids, bucket.tokens),
        position_ids=_padded(like.position_ids, bucket.tokens, dim=1),
        cu_seqlens=_padded(like.cu_seqlens, bucket.items + 1),
        max_len=bucket.max_len,
        pixel_values=_padded(like.pixel_values, bucket.patches) if has_images else None,
        vision_positions=_padded(like.vision_positions, bucket.patches) if has_images else None,
        vision_cu=_padded(like.vision_cu, bucket.images + 1) if has_images else None,
        vision_max_len=bucket.vision_max_len,
        image_rows=_padded(like.image_rows, bucket.patches // 4) if has_images else None,
        pixel_norm=bucket.pixel_norm,
    )


def pad_inputs(static: ForwardInputs, inputs: ForwardInputs) -> ForwardInputs:
    """Copy `inputs` into a bucket's buffers `static` (device copies only, no sync); returns `static`."""
    t, b = inputs.tokens, inputs.items
    static.input_ids[:t].copy_(inputs.input_ids)
    static.input_ids[t:].zero_()
    static.position_ids[:, :t].copy_(inputs.position_ids)
    static.position_ids[:, t:].zero_()
    static.cu_seqlens[: b + 1].copy_(inputs.cu_seqlens)
    static.cu_seqlens[b + 1 :].fill_(t)  # padding items: empty segments; padding tokens belong to none
    if static.pixel_values is not None:
        p, i, n = inputs.patches, inputs.images, inputs.patches // 4  # a bucket has images iff the batch has
        static.pixel_values[:p].copy_(inputs.pixel_values)
        static.vision_positions[:p].copy_(inputs.vision_positions)
        static.vision_cu[: i + 1].copy_(inputs.vision_cu)
        static.image_rows[:n].copy_(inputs.image_rows)
        static.pixel_values[p:].zero_()
        static.vision_positions[p:].zero_()
        static.vision_cu[i + 1 :].fill_(p)
        static.image_rows[n:].fill_(static.tokens - 1)  # the padding patches' tokens land in the padding row
    return static


def cuda_graph_capture(forward: Callable, static: ForwardInputs, pool) -> Callable[[], tuple]:
    """Warm `forward` up on `static` (Triton compiles outside the capture), capture it, and return a replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA calls (the encoder pins batches while this one runs) are
    # not part of this capture and must not invalidate it
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = forward(static)

    def replay():
        graph.replay()
        return outputs

    replay.graph = graph  # kept alive with the replay
    return replay


class GraphCache:
    """Replays a captured forward per bucket; `run` returns None where the caller should run eagerly."""

    def __init__(self, forward: Callable[[ForwardInputs], tuple], max_graphs: int = 8, min_uses: int = 2,
                 limits: BucketLimits = BucketLimits(), capture: Callable | None = None):
        if max_graphs < 1 or min_uses < 1:
            raise ValueError(f"max_graphs ({max_graphs}) and min_uses ({min_uses}) must be at least 1")
        self.forward, self.max_graphs, self.min_uses, self.limits = forward, max_graphs, min_uses, limits
        self.capture = capture or cuda_graph_capture
        self.graphs: OrderedDict[Bucket, tuple[ForwardInputs, Callable]] = OrderedDict()
        self.seen: dict[Bucket, int] = {}
        self.failed: set[Bucket] = set()
        self.pool = None
        self.stats = {"replays": 0, "captures": 0, "evictions": 0, "eager": 0}

    def run(self, inputs: ForwardInputs) -> tuple | None:
        """(h, v) sliced to the batch's rows from a replayed graph, or None (run eagerly)."""
        bucket = bucket_for(inputs, self.limits)
        entry = self.graphs.get(bucket) if bucket is not None else None
        if entry is None:
            if bucket is None or bucket in self.failed:
                self.stats["eager"] += 1
                return None
            self.seen[bucket] = self.seen.get(bucket, 0) + 1
            if self.seen[bucket] < self.min_uses:
                self.stats["eager"] += 1
                return None
            entry = self._capture(bucket, inputs)
            if entry is None:
                self.stats["eager"] += 1
                return None
        self.graphs.move_to_end(bucket)
        static, replay = entry
        pad_inputs(static, inputs)
        h, v = replay()
        self.stats["replays"] += 1
        return h[: inputs.tokens], (None if v is None else v[: inputs.patches // 4])

    def _capture(self, bucket: Bucket, inputs: ForwardInputs):
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)  # least recently used; its memory returns to the pool
            self.stats["evictions"] += 1
        static = pad_inputs(allocate_inputs(bucket, inputs), inputs)
        if self.pool is None and torch.cuda.is_available() and self.capture is cuda_graph_capture:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            replay = self.capture(self.forward, static, self.pool)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager path
            log.warning("CUDA graph capture failed for %s (%s: %s); this shape runs without graphs",
                        bucket, type(err).__name__, err)
            self.failed.add(bucket)
            return None
        self.graphs[bucket] = (static, replay)
        self.stats["captures"] += 1
        return static, replay
