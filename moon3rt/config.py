"""Model configuration: Qwen2-VL backbone keys plus the optional ``moon3`` block.

`Moon3Config` reads and writes an HF-style ``config.json``. Both layouts that exist in
the wild load: transformers-5 (``text_config`` / ``rope_parameters``) and the original
Qwen2-VL one (text keys at top level, ``rope_scaling``). It always writes the
transformers-5 layout, so transformers itself can read the backbone part back.

Named presets (`Moon3Config.from_name`):

- ``moon3-tiny``: a few narrow layers, for tests and the demo (random weights;
  `moon3rt.load("moon3-tiny")` loads the trained default of this architecture instead).
- ``moon3-mini``: moon3-tiny twice as wide (~1.2 M parameters), random weights.
- ``moon3-small``: a mid-size model (4 + 4 layers, width 256, 336x336 images) for CPU
  benchmarks that tiny shapes would flatter (random weights).
- ``moon3-2b``: Qwen2-VL-2B dimensions plus MOON3 heads, for benchmarks (random weights).
- ``qwen2-vl-2b``: the plain Qwen2-VL-2B backbone, GME-style pooling (random weights).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

FLAVOURS = ("moon3", "gme", "ume-r1", "qwen2-vl")
# The two tokens UME-R1 adds to Qwen2-VL's tokenizer (docs/MODEL.md, "UME-R1 checkpoints"):
# the discriminative and the generative embedding token.
UME_R1_TOKENS = ("<disc_emb>", "<gen_emb>")
POOLINGS = ("emb_token", "last", "mean")

# The shipped tokenizer (moon3rt/assets/moon3-tiny/tokenizer.json) numbers its special
# tokens 0..9 in this order; presets that use it carry these ids.
TINY_SPECIAL_IDS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 3,
    "<|vision_end|>": 4,
    "<|image_pad|>": 5,
    "<|video_pad|>": 6,
    "<emb>": 7,
    "<think>": 8,
    "</think>": 9,
}

DEFAULT_INSTRUCTION = "You are a helpful assistant."
# The request reasoning mode appends to the user turn, after the title (DESIGN.md, "Reasoning mode").
DEFAULT_REASONING_PROMPT = "\nDescribe the product's category, colour, material and design details."


class ConfigError(ValueError):
    """A config.json or preset that moon3rt cannot serve; the message names the key."""


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536  # width of the merged tokens = the LLM width
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def merged_dim(self) -> int:
        """Width of `Z`, the merger's grouped input: spatial_merge_size^2 * embed_dim."""
        return self.embed_dim * self.spatial_merge_size**2


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class FireConfig:
    layers: list[int] = field(default_factory=list)  # decoder layers after which FIRE injects
    rank: int = 64
    eps: float = 1e-6


@dataclass
class FusionConfig:
    num_heads: int = 8
    head_dim: int = 64


@dataclass
class ReasoningConfig:
    """``moon3.reasoning``: how the model writes its attributes before ``<emb>``.

    Prompt (docs/MODEL.md, "Reasoning mode"): the user turn holds the images, the title and
    then `prompt`; the assistant turn opens with ``{start_marker}\\n``; greedy decoding
    runs until `end_marker`, an end-of-text token or `max_tokens` generated tokens; then
    ``{end_marker}\\n<emb>`` closes the sequence and ``<emb>`` is pooled.
    """

    enabled: bool = False  # the default of `moon3rt.load(..., reasoning=None)`
    prompt: str = DEFAULT_REASONING_PROMPT
    start_marker: str = "<think>"
    end_marker: str = "</think>"
    max_tokens: int = 64


@dataclass
class Moon3HeadConfig:
    """The ``moon3`` block of config.json (DESIGN.md section 1)."""

    embed_token_id: int | None = None
    pooling: str = "emb_token"
    fire: FireConfig | None = field(default_factory=FireConfig)
    fusion: FusionConfig | None = field(default_factory=FusionConfig)
    projection_dim: int | None = 256
    matryoshka_dims: list[int] = field(default_factory=lambda: [256, 128, 64])
    instruction: str = DEFAULT_INSTRUCTION
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)


@dataclass
class Moon3Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int | None = 151645
    moon3: Moon3HeadConfig | None = None
    # Which published inference recipe the checkpoint follows (see `detect_flavour`).
    flavour: str = "qwen2-vl"
    # Preprocessing limits (pixels after smart resize) and title budget.
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    max_text_tokens: int = 512
    instruction: str = DEFAULT_INSTRUCTION

    # ------------------------------------------------------------------ derived
    @property
    def pooling(self) -> str:
        if self.moon3 is not None:
            return self.moon3.pooling
        return "last"

    @property
    def reasoning(self) -> ReasoningConfig:
        """``moon3.reasoning``, or the defaults (disabled) for a checkpoint without a moon3 block."""
        if self.moon3 is not None:
            return self.moon3.reasoning
        return ReasoningConfig()

    def reasoning_problems(self) -> list[str]:
        """Why this config cannot run reasoning mode (empty when it can, as far as the config tells)."""
        if self.flavour == "ume-r1":
            return []  # UME-R1's generative mode: its tokens are checked against the tokenizer
        m = self.moon3
        if m is None:
            return ["reasoning mode needs a MOON3 checkpoint (a `moon3` block in config.json with "
                    "embed_token_id and pooling 'emb_token'); this one has no moon3 block"]
        problems = []
        if m.embed_token_id is None:
            problems.append("reasoning mode appends <emb> and pools its state, but moon3.embed_token_id is not set")
        if m.pooling != "emb_token":
            problems.append(f"reasoning mode pools at <emb> and needs moon3.pooling='emb_token', "
                            f"this checkpoint has pooling={m.pooling!r}")
        return problems

    @property
    def output_dim(self) -> int:
        """Width of the vector `encode` returns before Matryoshka truncation."""
        if self.moon3 is not None and self.moon3.projection_dim:
            return self.moon3.projection_dim
        return self.text.hidden_size

    @property
    def has_fire(self) -> bool:
        return self.moon3 is not None and self.moon3.fire is not None and len(self.moon3.fire.layers) > 0

    @property
    def has_fusion(self) -> bool:
        return self.moon3 is not None and self.moon3.fusion is not None

    @property
    def has_projection(self) -> bool:
        return self.moon3 is not None and bool(self.moon3.projection_dim)

    @property
    def uses_mrope(self) -> bool:
        # GME's inference code runs the decoder without position ids, so its embeddings
        # were trained and published with sequential 1-D positions.
        return self.flavour != "gme"

    def validate(self) -> "Moon3Config":
        v, t = self.vision, self.text
        problems = []
        if v.embed_dim % v.num_heads:
            problems.append(f"vision_config.embed_dim={v.embed_dim} is not divisible by num_heads={v.num_heads}")
        elif v.head_dim % 4:
            problems.append(f"vision head_dim={v.head_dim} must be a multiple of 4 for 2-D RoPE")
        if t.hidden_size % t.num_attention_heads:
            problems.append(
                f"hidden_size={t.hidden_size} is not divisible by num_attention_heads={t.num_attention_heads}"
            )
        elif sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"mrope_section={t.mrope_section} must sum to head_dim/2={t.head_dim // 2}")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(
                f"num_attention_heads={t.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={t.num_key_value_heads}"
            )
        if v.hidden_size != t.hidden_size:
            problems.append(f"vision_config.hidden_size={v.hidden_size} != text hidden_size={t.hidden_size}")
        if self.flavour not in FLAVOURS:
            problems.append(f"flavour={self.flavour!r} is not one of {FLAVOURS}")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < t.vocab_size:
                problems.append(f"{name}={value} is outside the vocabulary (vocab_size={t.vocab_size})")
        if not 0 < self.min_pixels <= self.max_pixels:
            problems.append(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        m = self.moon3
        if m is not None:
            if m.pooling not in POOLINGS:
                problems.append(f"moon3.pooling={m.pooling!r} is not one of {POOLINGS}")
            if m.pooling == "emb_token" and m.embed_token_id is None:
                problems.append("moon3.pooling='emb_token' needs moon3.embed_token_id")
            if m.embed_token_id is not None and not 0 <= m.embed_token_id < t.vocab_size:
                problems.append(f"moon3.embed_token_id={m.embed_token_id} is outside the vocabulary")
            if m.fire is not None:
                bad = [layer for layer in m.fire.layers if not 0 <= layer < t.num_hidden_layers]
                if bad:
                    problems.append(f"moon3.fire.layers {bad} are not decoder layers (0..{t.num_hidden_layers - 1})")
                if len(set(m.fire.layers)) != len(m.fire.layers):
                    problems.append(f"moon3.fire.layers {m.fire.layers} has repeats")
                if m.fire.rank <= 0:
                    problems.append(f"moon3.fire.rank must be positive, got {m.fire.rank}")
            if m.fusion is not None and (m.fusion.num_heads <= 0 or m.fusion.head_dim <= 0):
                problems.append(f"moon3.fusion needs positive num_heads and head_dim, got {m.fusion}")
            r = m.reasoning
            if not isinstance(r.max_tokens, int) or isinstance(r.max_tokens, bool) or r.max_tokens < 0:
                problems.append(f"moon3.reasoning.max_tokens must be an integer >= 0, got {r.max_tokens!r}")
            if not isinstance(r.end_marker, str) or not r.end_marker:
                problems.append(f"moon3.reasoning.end_marker must be a non-empty string, got {r.end_marker!r}")
            for key in ("prompt", "start_marker"):
                if not isinstance(getattr(r, key), str):
                    problems.append(f"moon3.reasoning.{key} must be a string, got {getattr(r, key)!r}")
            if not isinstance(r.enabled, bool):
                problems.append(f"moon3.reasoning.enabled must be true or false, got {r.enabled!r}")
            full = m.projection_dim or t.hidden_size
            bad = [d for d in m.matryoshka_dims if not 0 < d <= full]
            if bad:
                problems.append(f"moon3.matryoshka_dims {bad} must lie in 1..{full}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "Moon3Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name]).validate()

    # -------------------------------------------------------------- config.json
    @classmethod
    def from_dict(cls, raw: dict[str, Any], flavour: str | None = None) -> "Moon3Config":
        raw = dict(raw)
        text_raw = dict(raw.get("text_config") or {})
        # Original Qwen2-VL layout: text keys at the top level.
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "rope_scaling",
            "rope_parameters", "tie_word_embeddings", "eos_token_id",
        ):
            if key not in text_raw and key in raw:
                text_raw[key] = raw[key]
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        try:
            text = TextConfig(
                vocab_size=int(text_raw["vocab_size"]),
                hidden_size=int(text_raw["hidden_size"]),
                intermediate_size=int(text_raw["intermediate_size"]),
                num_hidden_layers=int(text_raw["num_hidden_layers"]),
                num_attention_heads=int(text_raw["num_attention_heads"]),
                num_key_value_heads=int(text_raw.get("num_key_value_heads") or text_raw["num_attention_heads"]),
                rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", 1000000.0))),
                mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
                max_position_embeddings=int(text_raw.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))),
            )
        except KeyError as err:
            raise ConfigError(f"config.json is missing the text key {err.args[0]!r}") from None
        vraw = dict(raw.get("vision_config") or {})
        vrope = vraw.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(vraw.get("depth", 32)),
            embed_dim=int(vraw.get("embed_dim", 1280)),
            hidden_size=int(vraw.get("hidden_size", text.hidden_size)),
            mlp_ratio=float(vraw.get("mlp_ratio", 4)),
            num_heads=int(vraw.get("num_heads", 16)),
            in_channels=int(vraw.get("in_channels", vraw.get("in_chans", 3))),
            patch_size=int(vraw.get("patch_size", vraw.get("spatial_patch_size", 14))),
            spatial_merge_size=int(vraw.get("spatial_merge_size", 2)),
            temporal_patch_size=int(vraw.get("temporal_patch_size", 2)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        hidden_act = vraw.get("hidden_act", "quick_gelu")
        if hidden_act != "quick_gelu":
            raise ConfigError(f"vision_config.hidden_act={hidden_act!r}: only Qwen2-VL's quick_gelu is supported")
        eos = text_raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        moon3 = _moon3_from_dict(raw["moon3"]) if raw.get("moon3") is not None else None
        runtime = raw.get("moon3rt") or {}
        cfg = cls(
            vision=vision,
            text=text,
            image_token_id=int(raw.get("image_token_id", 151655)),
            video_token_id=int(raw.get("video_token_id", 151656)),
            vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
            eos_token_id=eos,
            moon3=moon3,
            flavour=flavour or runtime.get("flavour") or detect_flavour(raw),
            max_text_tokens=int(runtime.get("max_text_tokens", 512)),
            instruction=moon3.instruction if moon3 is not None else runtime.get("instruction", DEFAULT_INSTRUCTION),
        )
        if cfg.flavour == "ume-r1":
            # The processor limits UME-R1's evaluation passes on its command line, which replace
            # the checkpoint's preprocessor_config.json limits (docs/MODEL.md, "UME-R1 checkpoints").
            cfg.min_pixels, cfg.max_pixels = 784, 2359296
        if cfg.flavour == "gme":
            # GME's inference code takes its image-token limits from config.json.
            cfg.min_pixels = int(raw.get("min_image_tokens", 256)) * 28 * 28
            cfg.max_pixels = int(raw.get("max_image_tokens", 1280)) * 28 * 28
        if "min_pixels" in runtime:
            cfg.min_pixels = int(runtime["min_pixels"])
        if "max_pixels" in runtime:
            cfg.max_pixels = int(runtime["max_pixels"])
        return cfg

    def to_dict(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        out: dict[str, Any] = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "eos_token_id": self.eos_token_id,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
            },
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.hidden_size,
                "hidden_act": "quick_gelu",
                "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
            "moon3rt": {
                "flavour": self.flavour,
                "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels,
                "max_text_tokens": self.max_text_tokens,
                "instruction": self.instruction,
            },
        }
        if self.flavour == "gme":
            out["min_image_tokens"] = self.min_pixels // (28 * 28)
            out["max_image_tokens"] = self.max_pixels // (28 * 28)
        if self.moon3 is not None:
            out["moon3"] = dataclasses.asdict(self.moon3)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, flavour: str | None = None) -> "Moon3Config":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, flavour=flavour).validate()

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def detect_flavour(raw: dict[str, Any], tokens: Container[str] = ()) -> str:
    """How a checkpoint's config.json (and the tokens of its tokenizer) tell which inference
    recipe it follows.

    - a ``moon3`` block: MOON3 (M-RoPE, FIRE/MHMF/projection when present);
    - both UME-R1 tokens (``<disc_emb>``, ``<gen_emb>``) among `tokens`: UME-R1 (M-RoPE,
      the state at ``<disc_emb>``, or at the generated ``<gen_emb>`` in reasoning mode);
    - GME markers (``min_image_tokens``/``max_image_tokens``, or an architecture or
      ``_name_or_path`` naming GME): GME (1-D positions, ``last`` pooling);
    - otherwise a plain Qwen2-VL backbone (M-RoPE, ``last`` pooling).

    `moon3rt.load(..., flavour=...)` overrides the detection.
    """
    if raw.get("moon3") is not None:
        return "moon3"
    if all(token in tokens for token in UME_R1_TOKENS):
        return "ume-r1"
    # "gme" as a word of the checkpoint's name (not inside "segmentation"), or a Gme* architecture class
    path_says_gme = re.search(r"(^|[^a-z0-9])gme([^a-z0-9]|$)", str(raw.get("_name_or_path", "")).lower())
    arch_says_gme = any(str(a).startswith(("Gme", "GME")) for a in raw.get("architectures") or [])
    if "min_image_tokens" in raw or "max_image_tokens" in raw or path_says_gme or arch_says_gme:
        return "gme"
    return "qwen2-vl"


def _moon3_from_dict(raw: dict[str, Any]) -> Moon3HeadConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"the moon3 block must be an object, got {type(raw).__name__}")
    try:
        return _parse_moon3(raw)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"malformed moon3 block in config.json: {what}") from None


def _parse_moon3(raw: dict[str, Any]) -> Moon3HeadConfig:
    known = {f.name for f in dataclasses.fields(Moon3HeadConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"moon3 block has unknown keys {unknown}; known keys are {sorted(known)}")
    fire = raw.get("fire", None)
    fusion = raw.get("fusion", None)
    return Moon3HeadConfig(
        embed_token_id=None if raw.get("embed_token_id") is None else _int(raw["embed_token_id"], "embed_token_id"),
        pooling=raw.get("pooling", "emb_token"),
        fire=FireConfig(
            layers=[int(x) for x in fire.get("layers", [])],
            rank=int(fire.get("rank", 64)),
            eps=float(fire.get("eps", 1e-6)),
        )
        if fire
        else None,
        fusion=FusionConfig(num_heads=int(fusion["num_heads"]), head_dim=int(fusion["head_dim"])) if fusion else None,
        projection_dim=raw.get("projection_dim", 256),
        matryoshka_dims=list(raw.get("matryoshka_dims", [])),
        instruction=raw.get("instruction", DEFAULT_INSTRUCTION),
        reasoning=_reasoning_from_dict(raw.get("reasoning") or {}),
    )


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"moon3.{key} must be an integer, got {value!r}")
    return value


def _reasoning_from_dict(raw: dict[str, Any]) -> ReasoningConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"moon3.reasoning must be an object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(ReasoningConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"moon3.reasoning has unknown keys {unknown}; known keys are {sorted(known)}")
    return ReasoningConfig(**raw)


def _tiny_ids() -> dict[str, int]:
    return dict(
        image_token_id=TINY_SPECIAL_IDS["<|image_pad|>"],
        video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=TINY_SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=TINY_SPECIAL_IDS["<|vision_end|>"],
        eos_token_id=TINY_SPECIAL_IDS["<|im_end|>"],
    )


PRESETS: dict[str, Moon3Config] = {
    "moon3-tiny": Moon3Config(
        vision=VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
        text=TextConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, mrope_section=[2, 3, 3],
            max_position_embeddings=4096, tie_word_embeddings=True,
        ),
        moon3=Moon3HeadConfig(
            embed_token_id=TINY_SPECIAL_IDS["<emb>"], pooling="emb_token",
            fire=FireConfig(layers=[0, 2], rank=8), fusion=FusionConfig(num_heads=4, head_dim=16),
            projection_dim=48, matryoshka_dims=[48, 32, 16],
        ),
        flavour="moon3", min_pixels=56 * 56, max_pixels=28 * 28 * 64, max_text_tokens=128,
        **_tiny_ids(),
    ),
    "moon3-small": Moon3Config(
        vision=VisionConfig(depth=4, embed_dim=128, hidden_size=256, num_heads=4),
        text=TextConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0, mrope_section=[4, 6, 6],
            max_position_embeddings=4096, tie_word_embeddings=True,
        ),
        moon3=Moon3HeadConfig(
            embed_token_id=TINY_SPECIAL_IDS["<emb>"], pooling="emb_token",
            fire=FireConfig(layers=[0, 2], rank=16), fusion=FusionConfig(num_heads=4, head_dim=32),
            projection_dim=128, matryoshka_dims=[128, 64, 32],
        ),
        flavour="moon3", min_pixels=56 * 56, max_pixels=28 * 28 * 144, max_text_tokens=128,
        **_tiny_ids(),
    ),
    "moon3-2b": Moon3Config(
        vision=VisionConfig(),
        text=TextConfig(),
        moon3=Moon3HeadConfig(
            embed_token_id=TINY_SPECIAL_IDS["<emb>"], pooling="emb_token",
            fire=FireConfig(layers=[0, 7, 14, 21], rank=64), fusion=FusionConfig(num_heads=8, head_dim=64),
            projection_dim=256, matryoshka_dims=[256, 128, 64],
        ),
        flavour="moon3",
        **_tiny_ids(),
    ),
    "qwen2-vl-2b": Moon3Config(vision=VisionConfig(), text=TextConfig(), flavour="qwen2-vl", **_tiny_ids()),
}
# The embedded default's architecture with deterministic random weights (tests, benchmarks);
# `moon3rt.load("moon3-tiny")` loads the trained weights shipped in moon3rt/assets/moon3-tiny/.
PRESETS["moon3-tiny-random"] = copy.deepcopy(PRESETS["moon3-tiny"])
# moon3-tiny with a vision tower twice as wide and deep and a decoder twice as wide: the
# base of the ablation runs, since the world's images are what moon3-tiny fails to learn
# (docs/TRAINING.md).
_tiny = PRESETS["moon3-tiny"]
PRESETS["moon3-mini"] = dataclasses.replace(
    copy.deepcopy(_tiny),
    vision=dataclasses.replace(_tiny.vision, depth=4, embed_dim=64, hidden_size=128, num_heads=4),
    text=dataclasses.replace(_tiny.text, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                             num_attention_heads=8),
)
del _tiny
