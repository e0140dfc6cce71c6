"""UME-R1 checkpoints: the pieces of their authors' recipe that are not plain Qwen2-VL.

UME-R1 (Lan et al., "UME-R1: Exploring Reasoning-Driven Generative Multimodal
Embeddings", ICLR 2026) is a Qwen2-VL that embeds either directly (discriminative: the
final-norm state at ``<disc_emb>``) or after writing a reasoning trace (generative: the
state at the ``<gen_emb>`` it generates). docs/MODEL.md, "UME-R1 checkpoints", states the
recipe with the files of the authors' code it comes from; this module holds its data:

- the instruction that follows ``<disc_emb>`` in every prompt (`GENERATION_PROMPT`);
- the user text rule of the authors' eval collator (`user_text`);
- the 28 x 28 white image that stands in for a missing visual (`blank_image`);
- qwen-vl-utils' resize, which the authors' collator applies before the processor
  (`pre_resize`);
- what the checkpoint's ``generation_config.json`` says about decoding (`Generation`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .config import UME_R1_TOKENS
from .images import MAX_ASPECT_RATIO, ImageError, fit_area

DISC_EMB, GEN_EMB = UME_R1_TOKENS
GENERATION_PROMPT = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input "
    "in a word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<|image_pad|>", "<|video_pad|>"  # removed from user text
BLANK_SIDE = 28  # the white image of a text-only input is BLANK_SIDE x BLANK_SIDE pixels

# qwen-vl-utils' image limits: factor 28, between 4 and 16384 merged tokens.
PRE_RESIZE_FACTOR = 28
PRE_RESIZE_MIN_PIXELS = 4 * 28 * 28
PRE_RESIZE_MAX_PIXELS = 16384 * 28 * 28

# Reasoning budget when generation_config.json sets no max_new_tokens, and the most a
# checkpoint's own setting is taken up to (an explicit `max_reasoning_tokens` is not capped):
# 2048 is the completion length UME-R1's RL stage trained with. Each token of budget is
# KV-cache room held for every item of a batch.
DEFAULT_MAX_NEW_TOKENS = 2048


def user_text(text: str | None, has_images: bool) -> str:
    """The item's text as the authors' eval collator puts it before ``\n<disc_emb>\n``.

    Their datasets mark where an image goes with Qwen2-VL's image placeholder; the collator
    removes that string from the text of an input with images (and, for an input without,
    the video placeholder too) and strips the rest. moon3rt items carry their images
    separately, so the placeholders are dropped from any text, as the collator does.
    """
    text = (text or "").replace(IMAGE_PLACEHOLDER, "")
    if not has_images:
        text = text.replace(VIDEO_PLACEHOLDER, "")
    return text.strip()


def blank_image() -> Image.Image:
    """The visual of an input that has none: a white RGB image, BLANK_SIDE pixels square."""
    return Image.new("RGB", (BLANK_SIDE, BLANK_SIDE), (255, 255, 255))


def pre_resize(image: Image.Image) -> Image.Image:
    """qwen-vl-utils' resize of an image message (`fetch_image` with no size keys).

    Each side rounds to the nearest multiple of 28 (at least 28); an area above
    16384 x 28 x 28 scales both sides by sqrt(h * w / max) and rounds down, one below
    4 x 28 x 28 scales by sqrt(min / (h * w)) and rounds up; an aspect ratio over 200 is
    refused. The resize is PIL's default for RGB, BICUBIC. Returns `image` itself when the
    size is already right.
    """
    f = PRE_RESIZE_FACTOR
    width, height = image.size
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"({width}x{height}) is more than {MAX_ASPECT_RATIO}")
    h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
    # fit_area keeps each side >= f; with the aspect ratio at most 200 a side that fits
    # the maximum area is never below 28 anyway, so this is qwen-vl-utils' rule exactly
    h_bar, w_bar = fit_area(height, width, h_bar, w_bar, f, PRE_RESIZE_MIN_PIXELS, PRE_RESIZE_MAX_PIXELS)
    if (w_bar, h_bar) == image.size:
        return image
    return image.resize((w_bar, h_bar), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class Generation:
    """What generative mode takes from the checkpoint's ``generation_config.json``.

    stop_ids: its ``eos_token_id`` (Qwen2-VL's own file lists ``<|im_end|>`` and
    ``<|endoftext|>``, which is also what an empty tuple stands for). max_new_tokens: its
    ``max_new_tokens`` up to DEFAULT_MAX_NEW_TOKENS, else DEFAULT_MAX_NEW_TOKENS: the
    default of ``encode(max_reasoning_tokens=None)``.
    """

    stop_ids: tuple[int, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Generation:
        """Read `path` (a missing file gives the defaults).

        moon3rt decodes greedily. Qwen2-VL's file asks for sampling with top_k=1, which keeps
        only the most likely token: greedy. A file that samples otherwise (or sets a
        repetition penalty) is decoded greedily all the same, with a warning.
        """
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        eos = raw.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else [] if eos is None else None
        if eos is None or any(isinstance(i, bool) or not isinstance(i, int) for i in eos):
            raise ValueError(f"{path}: eos_token_id must be an integer or a list of integers, "
                             f"got {raw.get('eos_token_id')!r}")
        top_k, penalty = raw.get("top_k", 50), raw.get("repetition_penalty", 1.0)
        if (raw.get("do_sample", False) and top_k != 1) or penalty != 1.0:
            warnings.warn(f"{path} asks for sampling (do_sample with top_k={top_k}) or a repetition "
                          f"penalty ({penalty}); moon3rt decodes greedily without a penalty", stacklevel=3)
        budget = raw.get("max_new_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            budget = DEFAULT_MAX_NEW_TOKENS
        return cls(tuple(dict.fromkeys(eos)), min(budget, DEFAULT_MAX_NEW_TOKENS))
