"""transformers' Qwen2-VL as the oracle: build it from our config, run one item at a time;
`ReferenceProcessor` is its image processor (the PIL backend where it is a class of its own)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

try:  # transformers >= 5 with the PIL backend as its own class
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil as ReferenceProcessor,
    )
except ImportError:  # the older layout; if this is missing too, collection fails loudly
    from transformers import Qwen2VLImageProcessor as ReferenceProcessor

from moon3rt.config import Moon3Config

__all__ = ["ReferenceProcessor", "hf_config", "hf_last_hidden", "random_hf_model"]
from moon3rt.prompt import PreparedItem


def hf_config(cfg: Moon3Config) -> Qwen2VLConfig:
    raw = cfg.to_dict()
    raw.pop("moon3", None)
    raw.pop("moon3rt", None)
    hf = Qwen2VLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    hf._attn_implementation = "sdpa"
    hf.text_config._attn_implementation = "sdpa"
    hf.vision_config._attn_implementation = "sdpa"
    return hf


def random_hf_model(cfg: Moon3Config, seed: int = 0, generation: bool = False) -> Qwen2VLModel:
    """A seeded random `Qwen2VLModel`, or with `generation` the `Qwen2VLForConditionalGeneration`
    around one (its LM head random too when the config unties the embeddings)."""
    torch.manual_seed(seed)
    model = (Qwen2VLForConditionalGeneration if generation else Qwen2VLModel)(hf_config(cfg)).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every weight matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_last_hidden(model: Qwen2VLModel, item: PreparedItem, image_token_id: int, mrope: bool = True) -> torch.Tensor:
    """Last hidden states (L, d) of one item, the way transformers computes them."""
    ids = torch.from_numpy(item.input_ids)[None]
    kwargs = {}
    if item.images:
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate([im.pixel_values for im in item.images]))
        kwargs["image_grid_thw"] = torch.tensor([im.grid_thw for im in item.images])
        kwargs["mm_token_type_ids"] = (ids == image_token_id).int()
    if not mrope:  # GME: the decoder runs without position ids -> sequential 1-D positions
        kwargs["position_ids"] = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out.last_hidden_state[0]
