"""Batching by token budget and packing into a `PackedBatch` (varlen, no padding)."""

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
    if images:
        arrays = [img.pixel_values for img in images]
        if pin_memory:
            shape = (sum(a.shape[0] for a in arrays), arrays[0].shape[1])
            pixel_values = torch.empty(shape, dtype=torch.float32, pin_memory=True)
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
    )
