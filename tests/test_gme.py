"""GME checkpoints embed as GME's published inference code does, restated here independently.

The recipe (gme_inference.py of GME-Qwen2-VL): each image converted with PIL's plain
convert("RGB") and resized by its own smart-resize rule (factor 28, area 4..16384 x 28 x 28,
ratio clamped at 200) before the Qwen2-VL processor, which gets min/max pixels from
config.json's min_image_tokens/max_image_tokens x 28 x 28; the prompt
"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
+ image + text + "<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>"; the decoder run
without position ids (so sequential 1-D positions); the L2-normalised last state.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from oracle import ReferenceProcessor, random_hf_model
from PIL import Image

import moon3rt
from moon3rt.config import Moon3Config

TOKENIZER = Path(__file__).resolve().parents[1] / "moon3rt" / "assets" / "moon3-tiny" / "tokenizer.json"
MIN_TOKENS, MAX_TOKENS = 4, 20


def gme_fetch_image(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    f, lo, hi = 28, 4 * 28 * 28, 16384 * 28 * 28
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    if max(hb, wb) / min(hb, wb) > 200:
        hb, wb = (wb * 200, wb) if hb > wb else (hb, hb * 200)
    return image.resize((wb, hb))


@pytest.fixture(scope="module")
def gme(tmp_path_factory):
    cfg = Moon3Config.from_name("moon3-tiny-random")
    cfg.moon3, cfg.flavour = None, "qwen2-vl"
    hf = random_hf_model(cfg.validate(), seed=3)
    path = tmp_path_factory.mktemp("gme")
    hf.save_pretrained(path)
    shutil.copy(TOKENIZER, path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(min_image_tokens=MIN_TOKENS, max_image_tokens=MAX_TOKENS)  # GME's config keys
    (path / "config.json").write_text(json.dumps(raw))
    return hf, moon3rt.load(path, device="cpu", dtype="fp32")


def gme_reference(hf, text, image, image_token_id):
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    kwargs = {}
    if image is not None:
        prompt += "<|vision_start|><|image_pad|><|vision_end|>"
        processor = ReferenceProcessor(min_pixels=MIN_TOKENS * 784, max_pixels=MAX_TOKENS * 784)
        out = processor(images=[gme_fetch_image(image)], return_tensors="pt")
        kwargs = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        n_image_tokens = int(out["image_grid_thw"].prod()) // 4
    prompt += (text or "") + "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if image is not None:
        at = ids.index(image_token_id)
        ids = ids[:at] + [image_token_id] * n_image_tokens + ids[at + 1 :]
        kwargs["mm_token_type_ids"] = (torch.tensor(ids)[None] == image_token_id).int()
    ids = torch.tensor(ids)[None]
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(ids.shape[1])[None],
               **kwargs).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


def test_gme_checkpoint_embeds_like_the_published_recipe(gme):
    hf, enc = gme
    assert enc.config.flavour == "gme" and enc.config.pooling == "last"
    assert (enc.config.min_pixels, enc.config.max_pixels) == (MIN_TOKENS * 784, MAX_TOKENS * 784)
    rng = np.random.default_rng(0)
    noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    cases = [
        ("red tee", Image.fromarray(noise(40, 50))),
        ("tall", Image.fromarray(noise(300, 120))),  # pre-resized, then capped by max_image_tokens
        (None, Image.fromarray(noise(90, 90))),
        ("only text", None),
        ("transparent", Image.fromarray(noise(70, 80, 4), "RGBA")),  # GME drops alpha
    ]
    items = [{"text": t, "image": im} if im is not None else t for t, im in cases]
    got = enc.encode(items)
    for (text, image), vec in zip(cases, got):
        ref = gme_reference(hf, text, image, enc.config.image_token_id)
        assert np.abs(vec - ref).max() < 1e-5, (text, np.abs(vec - ref).max())
