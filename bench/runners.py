"""What the benchmark times: moon3rt backends and the peers, behind one interface.

A runner has `name`, `prepare(items) -> host inputs` (outside the timed region) and
`run(inputs) -> (B, D)` on the device (timed: host-to-device copy included, as in
`Encoder.encode`). `reference(items)` gives what a runner's output is checked against.

Pixels cross to the device as the timed region's bulk (~300 MB of fp32 patches per batch of
64 448x448 images), so every runner prepares them the same way (`host_pixels`): page-locked,
so the copy is one asynchronous DMA, and on CUDA in the model's 16-bit dtype when it has one
(both models cast the patches to their weights' dtype before the patch embedding, so the
result is the same and half the bytes cross).

- `BackendRunner`: a moon3rt backend, ``backend.embed(pack(items))``.
- `CompiledRunner`: ``torch.compile`` of the reference `Moon3Model`.
- `TransformersRunner`: transformers' `Qwen2VLModel` (sdpa) with the same weights,
  GME-style pooling (last token, L2-normalised) over right-padded batches with an
  attention mask, as the Qwen2-VL processor pads. It is the backbone only: no FIRE,
  MHMF or projection, so it is checked against our backbone with FIRE switched off.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
import torch.nn.functional as F

from moon3rt.backends import create_backend
from moon3rt.batching import pack
from moon3rt.model import Moon3Model, PackedBatch
from moon3rt.prompt import PreparedItem

PEERS = ("transformers", "torch.compile")


def host_pixels(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """The patches as the timed region copies them: on CUDA page-locked, in `dtype` when given."""
    if device.type != "cuda":
        return pixels
    out = torch.empty(pixels.shape, dtype=dtype or pixels.dtype, pin_memory=True)
    return out.copy_(pixels)


def pixel_dtype(model: Moon3Model, device: torch.device) -> torch.dtype | None:
    """The model's 16-bit dtype on CUDA (pixels are cast to it before the patch embedding), else None."""
    dtype = model.visual.patch_embed.proj.weight.dtype
    return dtype if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else None


def _packed(items: list[PreparedItem], merge: int, device: torch.device) -> PackedBatch:
    """The batch as `Encoder` makes it: uint8 patches, page-locked on CUDA (1 byte per value to copy)."""
    return pack(items, merge, pin_memory=device.type == "cuda")


class BackendRunner:
    def __init__(self, name: str, model: Moon3Model, device: torch.device):
        self.name = name
        self.backend = create_backend(name, model, device)
        self.merge, self.device = model.cfg.vision.spatial_merge_size, device

    def prepare(self, items: list[PreparedItem]) -> PackedBatch:
        return _packed(items, self.merge, self.device)

    def run(self, batch: PackedBatch) -> torch.Tensor:
        return self.backend.embed(batch)


class CompiledRunner:
    """`torch.compile(model)` with default settings; compilation happens in the warm-up."""

    name = "torch.compile"

    def __init__(self, model: Moon3Model, device: torch.device):
        self.model = torch.compile(model)
        self.device = device
        self.merge = model.cfg.vision.spatial_merge_size

    def prepare(self, items: list[PreparedItem]) -> PackedBatch:
        return _packed(items, self.merge, self.device)

    @torch.inference_mode()
    def run(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch.to(self.device)).float()


def hf_config(model: Moon3Model):
    """transformers' `Qwen2VLConfig` for the backbone of `model` (its MOON3 block dropped)."""
    from transformers import Qwen2VLConfig

    raw = model.cfg.to_dict()
    for key in ("moon3", "moon3rt", "architectures", "model_type"):
        raw.pop(key, None)
    text = raw["text_config"]
    text.setdefault("bos_token_id", None if text["vocab_size"] <= 151643 else 151643)  # Qwen's default id, if it fits
    return Qwen2VLConfig(**raw)


class TransformersRunner:
    name = "transformers"

    def __init__(self, model: Moon3Model, device: torch.device, dtype: torch.dtype, pad_token_id: int):
        from transformers import Qwen2VLModel

        cfg = model.cfg
        with torch.device(device):
            hf = Qwen2VLModel._from_config(hf_config(model), dtype=dtype, attn_implementation="sdpa")
        # Same names as ours (`visual.*`, `language_model.*`); the MOON3 heads have no place here.
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("moon3.")}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights do not map onto Qwen2VLModel: missing {missing}, unexpected {unexpected}")
        self.model = hf.eval()
        self.device, self.pad_token_id = device, pad_token_id
        self.pixel_dtype = pixel_dtype(model, device)  # Qwen2-VL's patch embedding casts to its dtype too
        self.image_token_id, self.mrope = cfg.image_token_id, cfg.uses_mrope
        # transformers >= 5.2x wants the processor's mm_token_type_ids for M-RoPE; older 5.x does not take it.
        self.takes_token_types = "mm_token_type_ids" in inspect.signature(hf.forward).parameters

    def prepare(self, items: list[PreparedItem]) -> dict[str, torch.Tensor]:
        length = max(it.num_tokens for it in items)
        ids = np.full((len(items), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(items), length), dtype=np.int64)
        for row, it in enumerate(items):  # right padding, as the Qwen2-VL processor pads
            ids[row, : it.num_tokens] = it.input_ids
            mask[row, : it.num_tokens] = 1
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        images = [img for it in items for img in it.images]
        if images:
            pixels = torch.from_numpy(np.concatenate([img.pixel_values for img in images]))
            inputs["pixel_values"] = host_pixels(pixels, self.device, self.pixel_dtype)
            inputs["image_grid_thw"] = torch.tensor([img.grid_thw for img in images], dtype=torch.int64)
            if self.takes_token_types:
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        if not self.mrope:  # GME runs the decoder on sequential 1-D positions
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inputs

    @torch.inference_mode()
    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        last = inputs["attention_mask"].sum(-1) - 1
        return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float(), dim=-1)


@contextlib.contextmanager
def fire_off(model: Moon3Model):
    """FIRE's gates at 0 (tanh(0) = 0): the model computes its plain backbone."""
    fire = model.fire
    if fire is None:
        yield
        return
    saved = fire.alpha.detach().clone()
    with torch.no_grad():
        fire.alpha.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            fire.alpha.copy_(saved)


@torch.inference_mode()
def backbone_reference(model: Moon3Model, items: list[PreparedItem], device: torch.device) -> torch.Tensor:
    """Our backbone's normalised final hidden state at each item's last token (what GME pools)."""
    batch = pack(items, model.cfg.vision.spatial_merge_size).to(device)
    with fire_off(model):
        hidden, _ = model.hidden_states(batch)
    return F.normalize(hidden[batch.cu_seqlens[1:].long() - 1].float(), dim=-1)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine between two (B, D) outputs."""
    return float(F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1).min())
