"""Batching by token budget, packing into a `PackedBatch` (varlen, no padding), and length
buckets for backends that run attention in a padded per-segment layout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .model import PackedBatch
from .prompt import PreparedItem


class TokenBudget:
    """Groups items, in arrival order, so that each group's summed cost stays within a budget.

    An item whose cost alone exceeds the budget forms a group by itself; the budget bounds
    every other group, so one huge item cannot inflate the batches around it. `max_items`
    caps the count as well.
    """

    def __init__(self, max_tokens: int, max_items: int | None = None):
        if max_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_tokens}")
        self.max_tokens, self.max_items = max_tokens, max_items
        self.group: list[int] = []
        self.cost = 0

    def add(self, index: int, cost: int) -> list[int] | None:
        """Add an item; returns the group that is complete without it, if there is one."""
        done = None
        full = self.max_items is not None and len(self.group) >= self.max_items
        if self.group and (self.cost + cost > self.max_tokens or full):
            done = self.flush()
        self.group.append(index)
        self.cost += cost
        return done

    def flush(self) -> list[int]:
        """The group gathered so far (possibly empty); starts a new one."""
        done, self.group, self.cost = self.group, [], 0
        return done


def _offsets(lengths: Iterable[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(list(lengths), dtype=np.int64)]), dtype=torch.int32)


def pack(items: Sequence[PreparedItem], image_merge: int = 2, pin_memory: bool = False) -> PackedBatch:
    """Concatenate prepared items into one packed batch (token order = item order).

    pin_memory: write the patches (the bulk of a batch) straight into page-locked host
    memory, so the copy to a CUDA device runs at full speed and asynchronously.
    """
    if not items:
        raise ValueError("cannot pack an empty batch")
    starts = np.concatenate([[0], np.cumsum([it.num_tokens for it in items])[:-1]])
    images = [img for it in items for img in it.images]
    merged = [sum(img.grid_thw[1] * img.grid_thw[2] // image_merge**2 for img in it.images) for it in items]
    pixel_norm = None
    if images:
        pixel_norm = images[0].norm
        for k, img in enumerate(images):
            if img.norm != pixel_norm:
                raise ValueError(f"image {k} of the batch is normalised by mean/std {img.norm}, image 0 by "
                                 f"{pixel_norm}: one batch takes one normalisation")
        arrays = [img.levels for img in images]  # uint8: the patch embedding normalises them
        if pin_memory:
            shape = (sum(a.shape[0] for a in arrays), arrays[0].shape[1])
            pixel_values = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            np.concatenate(arrays, out=pixel_values.numpy())
        else:
            pixel_values = torch.from_numpy(np.concatenate(arrays))
        grid_thw = torch.tensor([img.grid_thw for img in images], dtype=torch.int64)
    else:
        pixel_values = grid_thw = None
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([it.input_ids for it in items])),
        position_ids=torch.from_numpy(np.concatenate([it.position_ids for it in items], axis=1)),
        cu_seqlens=_offsets(it.num_tokens for it in items),
        pool_index=torch.tensor([s + it.pool_position for s, it in zip(starts, items)], dtype=torch.int64),
        title_index=torch.from_numpy(
            np.concatenate([s + it.title_positions for s, it in zip(starts, items)]).astype(np.int64)
        ),
        cu_titles=_offsets(len(it.title_positions) for it in items),
        cu_images=_offsets(merged),
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        pixel_norm=pixel_norm,
    )


# ------------------------------------------------------------------ length buckets
def segment_lengths(batch: PackedBatch, merge: int) -> tuple[list[int], list[list[int]]]:
    """(decoder tokens of each item, patches of each of its images) of a packed batch."""
    cu, cu_img = batch.cu_seqlens.tolist(), batch.cu_images.tolist()
    tokens = [cu[b + 1] - cu[b] for b in range(batch.num_items)]
    images: list[list[int]] = [[] for _ in tokens]
    if batch.image_grid_thw is not None and batch.image_grid_thw.numel():
        grid = batch.image_grid_thw.cpu().numpy()
        patches = grid.prod(axis=1)
        ends = np.cumsum(patches // merge**2)  # merged tokens up to the end of each image
        owner = np.searchsorted(np.asarray(cu_img[1:]), ends, side="left")  # item whose tokens hold image k
        for k, b in enumerate(owner.tolist()):
            images[b].append(int(patches[k]))
    return tokens, images


def padded_cost(tokens: Sequence[int], images: Sequence[Sequence[int]]) -> int:
    """Attention cells of a group in the padded per-segment layout: B items of L slots
    (L the longest item) plus N images of S slots (S the largest image), B L^2 + N S^2."""
    patches = [p for per_item in images for p in per_item]
    return len(tokens) * max(tokens, default=0) ** 2 + len(patches) * max(patches, default=0) ** 2


def attention_buckets(tokens: Sequence[int], images: Sequence[Sequence[int]], max_cells: int,
                      max_padding: float = 1.5) -> list[list[int]]:
    """Item indices grouped by length for a padded per-segment attention layout.

    Items are sorted by their longest segment (decoder tokens, then largest image) and
    cut into runs, so one long item among short ones does not pad the rest: a run stays
    within `max_cells` attention cells (`padded_cost`) and within `max_padding` times the
    cells its segments need unpadded (sum of L^2 and S^2). An item over the budget alone
    forms a group by itself. Each group lists its items in their original order.
    """
    if max_cells <= 0:
        raise ValueError(f"max_cells must be positive, got {max_cells}")
    order = sorted(range(len(tokens)), key=lambda b: (tokens[b], max(images[b], default=0)))
    groups: list[list[int]] = []
    group: list[int] = []
    exact = 0
    for b in order:
        need = tokens[b] ** 2 + sum(p * p for p in images[b])
        trial = group + [b]
        cost = padded_cost([tokens[i] for i in trial], [images[i] for i in trial])
        if group and (cost > max_cells or cost > max_padding * (exact + need)):
            groups.append(sorted(group))
            group, exact = [], 0
        group.append(b)
        exact += need
    if group:
        groups.append(sorted(group))
    return groups


def take_items(batch: PackedBatch, indices: Sequence[int], merge: int) -> PackedBatch:
    """The items `indices` (in that order) of a packed batch as a batch of their own."""
    cu, cu_t, cu_i = batch.cu_seqlens.tolist(), batch.cu_titles.tolist(), batch.cu_images.tolist()
    lengths = [cu[b + 1] - cu[b] for b in indices]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = torch.from_numpy(np.concatenate([np.arange(cu[b], cu[b + 1]) for b in indices]).astype(np.int64))
    titles = [batch.title_index[cu_t[b]:cu_t[b + 1]] - cu[b] + int(s) for b, s in zip(indices, starts)]
    pixel_values = grid = None
    if batch.pixel_values is not None and batch.image_grid_thw is not None and batch.image_grid_thw.numel():
        g = batch.image_grid_thw.cpu().numpy()
        merged = np.concatenate([[0], np.cumsum(g.prod(axis=1) // merge**2)])
        patches = np.concatenate([[0], np.cumsum(g.prod(axis=1))])
        spans = [np.searchsorted(merged, [cu_i[b], cu_i[b + 1]]) for b in indices]  # images of each item
        images = np.concatenate([np.arange(lo, hi) for lo, hi in spans]).astype(np.int64)
        if images.size:
            rows = np.concatenate([np.arange(patches[k], patches[k + 1]) for k in images]).astype(np.int64)
            pixel_values = batch.pixel_values[torch.from_numpy(rows).to(batch.pixel_values.device)]
            grid = batch.image_grid_thw[torch.from_numpy(images).to(batch.image_grid_thw.device)]
    pool = batch.pool_index.cpu()
    return PackedBatch(
        input_ids=batch.input_ids[tokens.to(batch.input_ids.device)],
        position_ids=batch.position_ids[:, tokens.to(batch.position_ids.device)],
        cu_seqlens=_offsets(lengths),
        pool_index=torch.tensor([int(pool[b]) - cu[b] + int(s) for b, s in zip(indices, starts)], dtype=torch.int64),
        title_index=torch.cat(titles) if titles else batch.title_index[:0],
        cu_titles=_offsets(cu_t[b + 1] - cu_t[b] for b in indices),
        cu_images=_offsets(cu_i[b + 1] - cu_i[b] for b in indices),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        pixel_norm=batch.pixel_norm if pixel_values is not None else None,
    )
