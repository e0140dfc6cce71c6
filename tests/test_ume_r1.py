"""UME-R1 checkpoints embed as their authors' code does, restated here independently.

The recipe (docs/MODEL.md, "UME-R1 checkpoints"): a stock Qwen2VLForConditionalGeneration;
each image through qwen-vl-utils' resize (factor 28, area 4..16384 x 28 x 28) and then the
Qwen2-VL processor with the limits the evaluation passes (784 .. 2359296 pixels, not the
checkpoint's preprocessor_config.json), a 28 x 28 white image when the input has none; the
chat template with its default system message, the visuals first, then the collator's user
text + "\\n<disc_emb>\\n" + the generation instruction, then the assistant prompt;
transformers' own M-RoPE positions (none passed), in the forward and in `generate`.
Discriminative: the final-norm state at the last <disc_emb>. Generative: `generate` with
the checkpoint's generation_config.json, then the state the authors' index rule picks from
its per-step hidden states (the step after the last generated <gen_emb>, or the last step).
Both L2-normalised.

The checkpoint is a tiny random Qwen2-VL saved by transformers, with the two tokens added to
the tokenizer and an untied LM head whose <gen_emb> and <|im_end|> rows copy (x1.01) the rows
of tokens the random model likes to write, so that its greedy text holds <gen_emb>, repeats
it, and sometimes stops at <|im_end|>.
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
from transformers import Qwen2VLForConditionalGeneration

import moon3rt
from moon3rt.config import Moon3Config

TOKENIZER = Path(__file__).resolve().parents[1] / "moon3rt" / "assets" / "moon3-tiny" / "tokenizer.json"
INSTRUCTION = (  # the one-line instruction of the authors' eval collator
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input in a "
    "word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = 784, 2359296  # the limits UME-R1's evaluation passes its processor
# The fixture's limits: config.json's moon3rt block lowers max_pixels, so that a small image
# is shrunk by the processor after qwen-vl-utils' resize.
MIN_PIXELS, MAX_PIXELS = EVAL_MIN_PIXELS, 28 * 28 * 40
BUDGET = 22
ATOL = 1e-5
DISC, GEN, IM_END, EOT = 1024, 1025, 2, 0  # ids in the test tokenizer
GEN_LIKES, IM_END_LIKES = 440, 293  # tokens the random model writes; their LM-head rows are copied


def rgb(height, width, seed, channels=3):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8))


# (text, images): text only, image only, image + text (upscaled), transparent, two images,
# and an image the processor's max_pixels shrinks after qwen-vl-utils' resize.
CASES = [
    ("  red cotton t-shirt \n", []),
    (None, [rgb(60, 90, 1)]),
    ("navy tee", [rgb(40, 50, 2)]),
    ("transparent", [rgb(70, 80, 3, channels=4)]),
    ("two views", [rgb(57, 83, 4), rgb(95, 73, 5)]),
    ("brown leather oxford shoes", [rgb(200, 300, 6)]),
]


def as_item(text, images):
    if not images:
        return text
    return {"text": text, "images": images} if len(images) > 1 else {"text": text, "image": images[0]}


def save_checkpoint(path: Path, hf, tokenizer: tokenizers.Tokenizer) -> Path:
    hf.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    # Qwen2-VL-2B-Instruct's generation settings: sampling with top_k=1, i.e. greedy.
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": EOT, "pad_token_id": EOT, "eos_token_id": [IM_END, EOT], "do_sample": True,
        "repetition_penalty": 1.0, "temperature": 0.01, "top_p": 0.001, "top_k": 1,
    }))
    config = json.loads((path / "config.json").read_text())
    config["moon3rt"] = {"max_pixels": MAX_PIXELS}
    (path / "config.json").write_text(json.dumps(config))
    # Qwen2-VL-2B-Instruct's own limits, which the authors' evaluation does not use.
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
        "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = Moon3Config.from_name("moon3-tiny")
    cfg.moon3, cfg.flavour = None, "qwen2-vl"
    cfg.text.vocab_size, cfg.text.tie_word_embeddings = 1040, False  # room for the two tokens; a random head
    hf = random_hf_model(cfg.validate(), seed=0, generation=True)
    with torch.no_grad():
        head = hf.lm_head.weight
        head[GEN] = 1.01 * head[GEN_LIKES]
        head[IM_END] = 1.01 * head[IM_END_LIKES]
    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    assert tokenizer.add_tokens(["<disc_emb>", "<gen_emb>"]) == 2
    assert (tokenizer.token_to_id("<disc_emb>"), tokenizer.token_to_id("<gen_emb>")) == (DISC, GEN)
    return save_checkpoint(tmp_path_factory.mktemp("ume-r1"), hf, tokenizer)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Reference(checkpoint)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return moon3rt.load(checkpoint, device="cpu", dtype="fp32")


# ---------------------------------------------------------------------- the restatement
def qwen_vl_utils_resize(image: Image.Image) -> Image.Image:
    """qwen-vl-utils' fetch_image for an image message without size keys."""
    if image.mode == "RGBA":  # pasted on white through its alpha
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
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
    return image.resize((wb, hb))


def collator_user_text(text, images):
    """The user text of the authors' eval collator for the row its datasets make of an item.

    Their datasets give an image input its image dicts and put Qwen2-VL's image placeholder
    in its text; a text-only input gets no image dict. The collator then takes one of three
    branches: image dicts and the placeholder in the text -> the text less the placeholder,
    stripped, after the images; image dicts without the placeholder -> the white image and
    the text as it is (its images unused; no dataset row of an item reaches it here); no
    image dicts -> the white image and the text less both placeholders, stripped.
    """
    row_text = ("<|image_pad|>" + (text or "")) if images else (text or "")
    has_image_dicts = bool(images)
    if has_image_dicts and "<|image_pad|>" in row_text:
        return row_text.replace("<|image_pad|>", "").strip()
    if has_image_dicts:
        return row_text
    return row_text.replace("<|video_pad|>", "").replace("<|image_pad|>", "").strip()


class Reference:
    """The authors' recipe, one item at a time, with transformers."""

    def __init__(self, path: Path):
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.processor = ReferenceProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

    def inputs(self, text, images) -> dict:
        visuals = [qwen_vl_utils_resize(im) for im in images] or [
            qwen_vl_utils_resize(Image.new("RGB", (28, 28), (255, 255, 255)))]
        out = self.processor(images=visuals, return_tensors="pt")
        prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        for grid in out["image_grid_thw"]:
            prompt += "<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // 4) + "<|vision_end|>"
        prompt += collator_user_text(text, images) + "\n<disc_emb>\n" + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
        ids = torch.tensor(self.tokenizer.encode(prompt, add_special_tokens=False).ids)[None]
        image_id = self.tokenizer.token_to_id("<|image_pad|>")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": out["pixel_values"],
                "image_grid_thw": out["image_grid_thw"], "mm_token_type_ids": (ids == image_id).int()}

    @torch.no_grad()
    def discriminative(self, text, images) -> np.ndarray:
        inputs = self.inputs(text, images)
        hidden = self.model(**inputs, output_hidden_states=True, return_dict=True).hidden_states[-1][0]
        at = max(j for j, t in enumerate(inputs["input_ids"][0].tolist()) if t == DISC)
        return torch.nn.functional.normalize(hidden[at], dim=-1).numpy()

    @torch.no_grad()
    def generative(self, text, images, budget=BUDGET) -> tuple[np.ndarray, list[int], str]:
        """(vector, generated ids, where the last <gen_emb> is: "followed" by two or more tokens,
        "second_last", "last" (the authors' code then takes the token before it), or "none")."""
        inputs = self.inputs(text, images)
        out = self.model.generate(**inputs, max_new_tokens=budget, output_hidden_states=True,
                                  return_dict_in_generate=True, use_cache=True)
        generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        step = -1  # the authors' index rule: search from the end for <gen_emb>
        for j in range(len(generated) - 1, -1, -1):
            if generated[j] == GEN:
                step = -1 if j + 1 >= len(generated) - 1 else j + 1
                break
        last = max((j for j, t in enumerate(generated) if t == GEN), default=None)
        n = len(generated)
        case = ("none" if last is None else "last" if last == n - 1 else "second_last" if last == n - 2
                else "followed")
        state = out.hidden_states[step][-1][0, -1]  # the final-norm state of that step's (last) input
        return torch.nn.functional.normalize(state, dim=-1).numpy(), generated, case

    def text(self, generated: list[int]) -> str:
        if generated and generated[-1] in (IM_END, EOT):
            generated = generated[:-1]
        return self.tokenizer.decode(generated, skip_special_tokens=True)


def assert_close(got, ref, what):
    err = float(np.abs(got - ref).max())
    assert err <= ATOL, f"{what}: differs from the restatement by {err:.2e}"


# --------------------------------------------------------------------------------- tests
def test_detected_from_the_tokenizer(encoder, checkpoint, tmp_path):
    assert encoder.config.flavour == "ume-r1" and encoder.config.uses_mrope
    assert (encoder.config.min_pixels, encoder.config.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    evaluated = tmp_path / "evaluated"  # no moon3rt block: the evaluation's limits, not the file's
    shutil.copytree(checkpoint, evaluated)
    config = json.loads((evaluated / "config.json").read_text())
    del config["moon3rt"]
    (evaluated / "config.json").write_text(json.dumps(config))
    cfg = moon3rt.load(evaluated, device="cpu").config
    assert (cfg.min_pixels, cfg.max_pixels) == (EVAL_MIN_PIXELS, EVAL_MAX_PIXELS)
    plan = encoder.reasoning_plan()
    assert plan.stop_ids == (IM_END, EOT) and plan.pool_id == GEN and plan.close_ids == ()
    assert plan.max_tokens == 2048  # generation_config.json sets no max_new_tokens
    assert moon3rt.load(checkpoint, device="cpu", flavour="qwen2-vl").config.flavour == "qwen2-vl"
    plain = tmp_path / "plain"  # the same weights with Qwen2-VL's own tokenizer: not UME-R1
    shutil.copytree(checkpoint, plain)
    shutil.copy(TOKENIZER, plain / "tokenizer.json")
    assert moon3rt.load(plain, device="cpu").config.flavour == "qwen2-vl"
    with pytest.raises(ValueError, match="ume-r1.*<disc_emb>"):
        moon3rt.load(plain, device="cpu", flavour="ume-r1")


def test_discriminative_matches_the_authors_recipe(encoder, reference):
    got = encoder.encode([as_item(*case) for case in CASES])
    for (text, images), vec in zip(CASES, got):
        assert_close(vec, reference.discriminative(text, images), f"discriminative {text!r}")


def test_generative_matches_the_authors_recipe(encoder, reference):
    got, texts = encoder.encode([as_item(*case) for case in CASES], reasoning=True,
                                max_reasoning_tokens=BUDGET, return_reasoning=True)
    cases = []
    for (text, images), vec, written in zip(CASES, got, texts):
        ref, generated, case = reference.generative(text, images)
        assert written == reference.text(generated), f"generated text of {text!r}"
        assert_close(vec, ref, f"generative {text!r} ({case}, generated {generated})")
        cases.append((case, generated[-1] in (IM_END, EOT), generated.count(GEN)))
    # what the fixture is built to exercise: <gen_emb> written more than once and followed by
    # more text, no <gen_emb> and an <|im_end|> stop
    assert any(c == "followed" and n > 1 for c, _, n in cases), cases
    assert any(c == "none" and stopped for c, stopped, _ in cases), cases


@pytest.mark.parametrize("after", [0, 1])
def test_budget_ending_at_gen_emb(encoder, reference, after):
    """The budget runs out on the second <gen_emb> (after=0: it was never fed back, and the
    authors' code takes the last step's state, the token before it, not the first
    <gen_emb>'s) or one token later (after=1: the last step is the one that fed it)."""
    text, images = CASES[0]
    _, generated, _ = reference.generative(text, images)
    budget = [j for j, t in enumerate(generated) if t == GEN][1] + 1 + after
    ref, short, case = reference.generative(text, images, budget)
    assert case == ("last", "second_last")[after], (case, short)
    got = encoder.encode([as_item(text, images)], reasoning=True, max_reasoning_tokens=budget)[0]
    assert_close(got, ref, f"budget ending {after} token(s) after <gen_emb>")


def test_generation_without_gen_emb_falls_back(tmp_path, reference):
    """A checkpoint that never writes <gen_emb> embeds the state of the last token fed."""
    path = tmp_path / "never"
    hf = reference.model
    with torch.no_grad():
        saved = hf.lm_head.weight[GEN].clone()
        hf.lm_head.weight[GEN] = -hf.lm_head.weight[GEN_LIKES].abs()  # never the largest logit
        try:
            save_checkpoint(path, hf, reference.tokenizer)
        finally:
            hf.lm_head.weight[GEN] = saved
    never = Reference(path)
    enc = moon3rt.load(path, device="cpu", dtype="fp32")
    got = enc.encode([as_item(*case) for case in CASES[:3]], reasoning=True, max_reasoning_tokens=BUDGET)
    for (text, images), vec in zip(CASES[:3], got):
        ref, generated, case = never.generative(text, images)
        assert case == "none", generated
        assert_close(vec, ref, f"fallback {text!r}")


# Texts written as the authors' datasets write them, with Qwen2-VL's placeholders in them.
PLACEHOLDER_CASES = [
    ("<|image_pad|>Represent the given image: navy tee\n", [rgb(40, 50, 8)]),
    (" <|video_pad|>red <|image_pad|>cotton t-shirt\n", []),
]


def test_placeholders_are_dropped_as_the_collator_does(encoder, reference):
    items = [as_item(*case) for case in PLACEHOLDER_CASES]
    for (text, images), vec in zip(PLACEHOLDER_CASES, encoder.encode(items)):
        assert_close(vec, reference.discriminative(text, images), f"discriminative {text!r}")
    got = encoder.encode(items[:1], reasoning=True, max_reasoning_tokens=8)[0]
    assert_close(got, reference.generative(*PLACEHOLDER_CASES[0], budget=8)[0], "generative placeholder")


def test_text_only_items_get_the_white_image(encoder):
    prepared = encoder.prepare("red cotton t-shirt")
    assert len(prepared.images) == 1 and prepared.images[0].grid_thw == (1, 4, 4)  # 28x28 -> 56x56
    white = Image.new("RGB", (28, 28), (255, 255, 255))
    for reasoning in (False, True):
        got = encoder.encode(["red cotton t-shirt", {"text": "red cotton t-shirt", "image": white}],
                             reasoning=reasoning, max_reasoning_tokens=6)
        np.testing.assert_array_equal(got[0], got[1])


def test_a_mixed_batch_equals_each_item_alone(encoder):
    items = [as_item(*case) for case in CASES[:3]]  # text only, image only, image + text
    for reasoning in (False, True):
        batch = encoder.encode(items, reasoning=reasoning, max_reasoning_tokens=BUDGET)
        for i, item in enumerate(items):
            alone = encoder.encode([item], reasoning=reasoning, max_reasoning_tokens=BUDGET)[0]
            assert_close(batch[i], alone, f"item {i} (reasoning={reasoning}) in a batch vs alone")


def test_generation_config_sets_the_stops_and_the_budget(checkpoint, tmp_path):
    path = tmp_path / "configured"
    shutil.copytree(checkpoint, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": IM_END, "max_new_tokens": 9000}))
    plan = moon3rt.load(path, device="cpu").reasoning_plan()
    assert plan.stop_ids == (IM_END,) and plan.max_tokens == 2048  # capped
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 300, "do_sample": True, "top_k": 20}))
    with pytest.warns(UserWarning, match="decodes greedily"):
        enc = moon3rt.load(path, device="cpu")
    plan = enc.reasoning_plan()
    assert plan.stop_ids == (IM_END, EOT) and plan.max_tokens == 300
    assert enc.reasoning_plan(5).max_tokens == 5
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(ValueError, match="eos_token_id must be an integer"):
        moon3rt.load(path, device="cpu")


def test_a_bad_image_fails_alone(encoder):
    items = ["red cotton t-shirt", {"text": "a ribbon", "image": rgb(2, 500, 7)}, as_item(*CASES[2])]
    result = encoder.encode_with_report(items, reasoning=True, max_reasoning_tokens=4)
    assert [f.index for f in result.failures] == [1] and "aspect ratio" in str(result.failures[0])
    assert np.isnan(result.embeddings[1]).all() and np.isfinite(result.embeddings[[0, 2]]).all()
    assert result.reasoning[1] is None and result.reasoning[0] is not None


def test_triton_backend_matches(checkpoint, encoder):
    fast = moon3rt.load(checkpoint, device="cpu", dtype="fp32", backend="triton")
    items = [as_item(*CASES[2])]  # one image + text item, generative mode: the interpreter is slow
    got, texts = fast.encode(items, reasoning=True, max_reasoning_tokens=6, return_reasoning=True)
    ref, ref_texts = encoder.encode(items, reasoning=True, max_reasoning_tokens=6, return_reasoning=True)
    assert texts == ref_texts
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4, f"triton vs torch: {err:.2e}"
