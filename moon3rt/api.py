"""The public API: `load(model) -> Encoder`, `Encoder.encode(items)`, `encode(items)`."""

from __future__ import annotations

import json
import numbers
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import ume_r1
from .backends import create_backend
from .batching import TokenBudget, pack
from .checkpoint import CheckpointError, load_model
from .config import PRESETS, UME_R1_TOKENS, Moon3Config, detect_flavour
from .images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_ASPECT_RATIO,
    ImageError,
    gme_pre_resize,
    load_image,
    preprocess_image,
)
from .items import Item, ItemError, to_item
from .model import Moon3Model, matryoshka, random_model
from .prompt import PreparedItem, PromptBuilder, ReasoningPlan, TextTooLongError, TokenizerError, load_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER = ASSETS / "moon3-tiny" / "tokenizer.json"
# The embedded default: weights trained by `python -m moon3rt train --recipe moon3-tiny`
# (docs/TRAINING.md). The random-weight architecture stays available as "moon3-tiny-random".
TRAINED_DEFAULT = ASSETS / "moon3-tiny"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
ON_ERROR = ("raise", "skip")


class EncodeError(ValueError):
    """Raised by `encode(on_error="raise")`: every bad item with its index and reason."""

    def __init__(self, failures: Sequence[ItemError]):
        self.failures = list(failures)
        lines = "\n".join(f"  {f}" for f in self.failures[:20])
        more = f"\n  ... and {len(self.failures) - 20} more" if len(self.failures) > 20 else ""
        super().__init__(f"{len(self.failures)} item(s) cannot be embedded:\n{lines}{more}")


@dataclass
class EncodeResult:
    """Embeddings (n, dim) float32 in input order; a failed item's row is NaN.

    `reasoning`: in reasoning mode, the text each item generated before ``<emb>`` (None for
    a failed item); None in direct mode. `truncated`: indices of the items whose title was
    cut to ``max_text_tokens`` (they are embedded, not failures), ascending.
    """

    embeddings: np.ndarray
    failures: list[ItemError] = field(default_factory=list)
    reasoning: list[str | None] | None = None
    truncated: list[int] = field(default_factory=list)

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.embeddings), dtype=bool)
        mask[[f.index for f in self.failures]] = False
        return mask


def positive_int(name: str, value: Any) -> int:
    """`value` as an int (numpy integers too), or a ValueError naming the argument."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of fp32, bf16, fp16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class Encoder:
    """A loaded model plus its preprocessing; `encode` is safe to call from several threads.

    `reasoning`: whether `encode` reasons before it embeds by default (None: the
    checkpoint's ``moon3.reasoning.enabled``). `generation`: a UME-R1 checkpoint's
    decoding settings (from its generation_config.json).
    """

    def __init__(self, model: Moon3Model, tokenizer, device: torch.device, dtype: torch.dtype,
                 backend: str = "torch", name: str = "", image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 reasoning: bool | None = None, generation: ume_r1.Generation | None = None):
        self.model = model
        self.config: Moon3Config = model.cfg
        self.device, self.dtype, self.name = device, dtype, name
        self.prompt = PromptBuilder(self.config, tokenizer, generation)
        self.backend = create_backend(backend, model, device)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.reasoning = self.config.reasoning.enabled if reasoning is None else bool(reasoning)
        self._decoder = None

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, backend={self.backend.name!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype}, dim={self.config.output_dim}, flavour={self.config.flavour!r}, "
                f"reasoning={self.reasoning})")

    @property
    def dim(self) -> int:
        return self.config.output_dim

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, obj: Any, index: int = 0, truncate: bool = True, reasoning: bool = False, *,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreparedItem:
        """Validate, decode, resize, patchify and tokenise one item (raises `ItemError`).

        reasoning: build reasoning mode's prompt (the prefix generation continues). A title
        longer than ``max_text_tokens`` is cut (``truncate=True``, the result's `truncated`
        is set; `encode` warns once per call) or refused. max_image_pixels: refuse an image
        larger than this (for a file, by its header, before it is decoded).
        """
        item = to_item(obj, index)
        cfg, v = self.config, self.config.vision
        images = []
        sources = item.images
        text = item.text
        if cfg.flavour == "ume-r1":
            text = ume_r1.user_text(text, bool(sources))
            if not sources:  # UME-R1's inputs always hold a visual
                sources = [ume_r1.blank_image()]
        for j, source in enumerate(sources):
            try:
                gme = cfg.flavour == "gme"  # GME's own code drops alpha before its processor
                image = load_image(source, max_image_pixels=max_image_pixels, target_pixels=cfg.max_pixels,
                                   composite_alpha=not gme, max_aspect_ratio=None if gme else MAX_ASPECT_RATIO)
                if gme:
                    image = gme_pre_resize(image)
                elif cfg.flavour == "ume-r1":  # qwen-vl-utils' resize, then the processor's
                    image = ume_r1.pre_resize(image)
                images.append(preprocess_image(
                    image, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=v.patch_size,
                    merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                    mean=self.image_mean, std=self.image_std,
                ))
            except ImageError as err:
                where = f"image {j}: " if len(item.images) > 1 else "image: "
                raise ItemError(index, where + str(err)) from None
        try:
            prepared = self.prompt.build(text, images, truncate=truncate, reasoning=reasoning)
        except TextTooLongError as err:
            raise ItemError(index, str(err)) from None
        return prepared

    # ------------------------------------------------------------------------ encode
    def encode(self, items: Iterable[Any], batch_size: int = 64, max_batch_tokens: int = 16384,
               dim: int | None = None, normalize: bool = True, show_progress: bool = False,
               on_error: str = "raise", truncate: bool = True, num_workers: int | None = None, *,
               reasoning: bool | None = None, max_reasoning_tokens: int | None = None,
               return_reasoning: bool = False) -> np.ndarray | tuple[np.ndarray, list[str | None]]:
        """Embed items; returns a float32 array (n, dim) in input order.

        items: str (text), image (pathlib.Path, bytes, PIL image, HxWx3 uint8 array), a dict
        with ``text`` and ``image``/``images``, or `moon3rt.Item`. Batches hold at most
        `batch_size` items and `max_batch_tokens` decoder tokens plus vision patches (plus,
        in reasoning mode, each item's room to reason).
        on_error: "raise" raises `EncodeError` naming every bad item; "skip" embeds the rest,
        leaves NaN rows for the failures and warns (use `encode_with_report` to get them).
        reasoning: generate the product's attributes before ``<emb>`` (default: the
        encoder's, from the checkpoint's ``moon3.reasoning.enabled``); greedy decoding stops
        at the end marker, end of text or `max_reasoning_tokens` (default
        ``moon3.reasoning.max_tokens``). return_reasoning: return ``(embeddings, texts)``,
        the generated text per item (None for a failed item).
        UME-R1 checkpoints: reasoning=False is their discriminative embedding (the state at
        ``<disc_emb>``), reasoning=True their generative one (the state at the generated
        ``<gen_emb>``; decoding stops at the end-of-text ids of generation_config.json, and
        `max_reasoning_tokens` defaults to its max_new_tokens, at most 2048, else 2048).
        """
        if return_reasoning and not (self.reasoning if reasoning is None else reasoning):
            raise ValueError("return_reasoning=True needs reasoning mode: pass reasoning=True")
        result = self._encode(items, batch_size, max_batch_tokens, dim, normalize, show_progress, on_error,
                              truncate, num_workers, reasoning, max_reasoning_tokens)
        self._warn_truncated(result.truncated)
        if result.failures:
            warnings.warn(f"{len(result.failures)} item(s) skipped: "
                          + "; ".join(str(f) for f in result.failures[:5]), stacklevel=2)
        return (result.embeddings, result.reasoning) if return_reasoning else result.embeddings

    def encode_with_report(self, items: Iterable[Any], batch_size: int = 64, max_batch_tokens: int = 16384,
                           dim: int | None = None, normalize: bool = True, show_progress: bool = False,
                           on_error: str = "skip", truncate: bool = True,
                           num_workers: int | None = None, *, reasoning: bool | None = None,
                           max_reasoning_tokens: int | None = None) -> EncodeResult:
        """`encode`, returning the embeddings with the failures (and reasoning texts, and the
        indices of truncated titles) instead of warning about failures; truncated titles
        still give one warning per call."""
        result = self._encode(items, batch_size, max_batch_tokens, dim, normalize, show_progress, on_error,
                              truncate, num_workers, reasoning, max_reasoning_tokens)
        self._warn_truncated(result.truncated)
        return result

    def _warn_truncated(self, truncated: list[int]) -> None:
        if truncated:  # one line per call, however many items: stacklevel 3 names the caller of encode*
            shown = ", ".join(map(str, truncated[:10])) + (", ..." if len(truncated) > 10 else "")
            warnings.warn(f"{len(truncated)} title(s) truncated to max_text_tokens={self.config.max_text_tokens} "
                          f"(items {shown})", stacklevel=3)

    def _encode(self, items, batch_size, max_batch_tokens, dim, normalize, show_progress, on_error, truncate,
                num_workers, reasoning, max_reasoning_tokens) -> EncodeResult:
        reasoning = self.reasoning if reasoning is None else bool(reasoning)
        if isinstance(max_reasoning_tokens, numbers.Integral) and not isinstance(max_reasoning_tokens, bool):
            max_reasoning_tokens = int(max_reasoning_tokens)  # numpy integers too
        plan = self.reasoning_plan(max_reasoning_tokens) if reasoning else None
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if dim is not None:
            if not (isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and 0 < dim <= self.dim):
                raise ValueError(f"dim={dim!r} is out of range: this model's vectors have {self.dim} dimensions; "
                                 f"give an integer from 1 to {self.dim}")
            dim = int(dim)  # numpy integers too
        batch_size = positive_int("batch_size", batch_size)
        max_batch_tokens = positive_int("max_batch_tokens", max_batch_tokens)
        if num_workers is not None:
            num_workers = positive_int("num_workers", num_workers)
        if isinstance(items, (str, bytes, bytearray, memoryview, dict, np.ndarray, Image.Image, os.PathLike, Item)) \
                or not isinstance(items, Iterable):
            raise TypeError("encode() takes a list of items; wrap a single item in a list")
        items = list(items)
        out = np.full((len(items), dim or self.dim), np.nan, dtype=np.float32)
        texts: list[str | None] | None = [None] * len(items) if plan is not None else None
        room = plan.max_tokens + len(plan.close_ids) if plan is not None else 0  # cache slots to reason in
        failures: dict[int, ItemError] = {}
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        bar = tqdm(total=len(items), disable=not show_progress, unit="item", desc="encode")
        budget = TokenBudget(max_batch_tokens, batch_size)
        prepared: dict[int, PreparedItem] = {}
        truncated: list[int] = []

        def run(group: list[int]) -> None:
            if group and not (failures and on_error == "raise"):
                self._run(group, prepared, out, failures, dim, normalize, on_error, plan, texts)
            bar.update(len(group))
            for i in group:
                del prepared[i]

        # A stream: worker threads prepare a bounded number of items ahead while the model runs
        # the batch before them, so host memory holds one batch plus the look-ahead.
        ahead = 2 * workers
        with ThreadPoolExecutor(max_workers=workers) as pool:
            submit = lambda i: pool.submit(self._try_prepare, items[i], i, truncate, plan is not None)
            pending = [submit(i) for i in range(min(ahead, len(items)))]
            for i in range(len(items)):
                result = pending[i].result()
                pending[i] = None
                if i + ahead < len(items):
                    pending.append(submit(i + ahead))
                if not isinstance(result, ItemError) and plan is not None:
                    problem = self._reasoning_positions_problem(result, plan)
                    result = ItemError(i, problem) if problem else result
                if isinstance(result, ItemError):
                    failures[i] = result
                    bar.update(1)
                elif failures and on_error == "raise":
                    bar.update(1)  # keep validating, so the error names every bad item, but embed nothing
                else:
                    if result.truncated:
                        truncated.append(i)
                    prepared[i] = result
                    done = budget.add(i, result.cost + room)
                    if done:
                        run(done)
            run(budget.flush())
        bar.close()
        if failures and on_error == "raise":
            raise EncodeError(sorted(failures.values(), key=lambda f: f.index))
        truncated = [i for i in truncated if i not in failures]  # a failed item is reported as a failure only
        return EncodeResult(out, sorted(failures.values(), key=lambda f: f.index), texts, truncated)

    def reasoning_plan(self, max_tokens: int | None = None) -> ReasoningPlan:
        """Reasoning mode's token rules with a budget of `max_tokens` (default: the config's).

        Raises ValueError naming every reason this model cannot reason (no <emb> pooling, an
        end marker the tokenizer lacks, untied embeddings without ``lm_head.weight``, a
        backend without a decode path), or why the budget cannot fit: the shortest prompt
        plus the budget plus the closing tokens must fit ``max_position_embeddings``, and one
        such item's KV cache must fit the device's free memory.
        """
        from .generate import decoder_for  # imported on first use: direct mode never needs it

        problems = self.prompt.reasoning_problems()
        if self.model.output_embeddings() is None:
            problems.append("the checkpoint has untied word embeddings (tie_word_embeddings false) but no "
                            "lm_head.weight, so it has no logits to generate with")
        if self._decoder is None:
            try:
                self._decoder = decoder_for(self.backend)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("this model cannot run reasoning mode: " + "; ".join(problems))
        plan = self.prompt.reasoning_plan()
        plan = plan if max_tokens is None else plan.with_budget(max_tokens)
        self._check_reasoning_budget(plan)
        return plan

    def _check_reasoning_budget(self, plan: ReasoningPlan) -> None:
        from .generate import KVCache

        problem = self.prompt.budget_problem(plan)
        if problem is not None:
            raise ValueError(problem)
        shortest = self.prompt.shortest_prompt(reasoning=True)
        closing = len(plan.close_ids)
        per_position = KVCache.bytes_per_position(self.config.text, self.dtype)
        need = (shortest + plan.max_tokens + closing) * per_position
        free = free_memory(self.device)
        if free is not None and need > free:
            raise ValueError(
                f"max_reasoning_tokens={plan.max_tokens} cannot fit in memory: one item's KV cache needs "
                f"{need / 2**30:.2f} GiB ({per_position} bytes a position), more than the {free / 2**30:.2f} GiB "
                f"free on {self.device}; at most {max(0, free // per_position - shortest - closing)} tokens fit")

    def _reasoning_positions_problem(self, prepared: PreparedItem, plan: ReasoningPlan) -> str | None:
        """Why this prompt cannot reason with the plan's budget within the model's positions."""
        limit = self.config.text.max_position_embeddings
        used = int(prepared.position_ids.max()) + 1
        need = used + plan.max_tokens + len(plan.close_ids)
        if need <= limit:
            return None
        return (f"the prompt takes {used} positions; with max_reasoning_tokens={plan.max_tokens} and "
                f"{len(plan.close_ids)} closing tokens it needs {need}, more than max_position_embeddings={limit}")

    def _try_prepare(self, obj: Any, index: int, truncate: bool, reasoning: bool = False) -> PreparedItem | ItemError:
        try:
            return self.prepare(obj, index, truncate, reasoning)
        except ItemError as err:
            return err.detached()

    # ------------------------------------------------ batches formed by the caller (the server)
    @staticmethod
    def batch_cost(prepared: PreparedItem, plan: ReasoningPlan | None = None) -> int:
        """What one prepared item costs a `TokenBudget`, as `encode` counts it (plus room to reason)."""
        return prepared.cost + (plan.max_tokens + len(plan.close_ids) if plan is not None else 0)

    def embed_prepared(self, prepared: Sequence[PreparedItem], plan: ReasoningPlan | None = None) -> EncodeResult:
        """Embed items made by `prepare` as one batch; rows are raw (full width, not normalised).

        For callers that group items themselves (by `TokenBudget` and `batch_cost`) and apply
        `model.matryoshka` per request. As in `encode`, a batch that fails is retried item by
        item, so only the culprit fails; failure indices are positions in `prepared`.
        """
        out = np.full((len(prepared), self.dim), np.nan, dtype=np.float32)
        texts: list[str | None] | None = [None] * len(prepared) if plan is not None else None
        failures: dict[int, ItemError] = {}
        self._run(list(range(len(prepared))), dict(enumerate(prepared)), out, failures, None, False, "skip",
                  plan, texts)
        return EncodeResult(out, sorted(failures.values(), key=lambda f: f.index), texts)

    def _embed_batch(self, indices, prepared, plan, texts) -> torch.Tensor:
        batch = pack([prepared[i] for i in indices], self.config.vision.spatial_merge_size,
                     pin_memory=self.device.type == "cuda")
        if plan is None:
            return self.backend.embed(batch)
        from .generate import generate

        result = generate(self._decoder, batch, plan, self.model.output_embeddings())
        decode = self.prompt.tokenizer.decode
        for i, tokens in zip(indices, result.tokens):
            texts[i] = decode(tokens, skip_special_tokens=True)
        return result.vectors

    def _run(self, indices, prepared, out, failures, dim, normalize, on_error, plan=None, texts=None) -> None:
        try:
            y = self._embed_batch(indices, prepared, plan, texts)
        except (RuntimeError, ValueError) as err:
            if len(indices) > 1:  # find the culprit without costing the other items their results
                for i in indices:
                    self._run([i], prepared, out, failures, dim, normalize, on_error, plan, texts)
                return
            failure = ItemError(indices[0], f"model failed: {err}")
            if on_error == "raise":
                raise EncodeError([failure]) from err
            failures[indices[0]] = failure
            return
        finite = torch.isfinite(y).all(dim=-1).cpu().tolist()
        if not all(finite):  # e.g. fp16 overflow: an error for that item, never a NaN "success"
            bad = [ItemError(i, "model produced non-finite values (overflow in this dtype?)")
                   for i, ok in zip(indices, finite) if not ok]
            if on_error == "raise":
                raise EncodeError(bad)
            failures.update((f.index, f) for f in bad)
        rows = matryoshka(y, dim, normalize).cpu().numpy()
        for row, (i, ok) in enumerate(zip(indices, finite)):
            if ok:
                out[i] = rows[row]


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: the driver's free memory; CPU: the
    kernel's MemAvailable), or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------- loading
def _preprocessor_overrides(directory: Path, cfg: Moon3Config, raw: dict) -> tuple[tuple, tuple]:
    """Pixel limits and mean/std from preprocessor_config.json, unless config.json fixes them."""
    mean, std = CLIP_MEAN, CLIP_STD
    path = directory / "preprocessor_config.json"
    if not path.exists():
        return mean, std
    try:
        pre = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(pre, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(pre).__name__}")
    mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    for key, value in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{path}: {key} must be a list of 3 numbers (R, G, B), got {value!r}")
    if not all(v > 0 for v in std):
        raise CheckpointError(f"{path}: image_std must be positive, got {std!r}")
    runtime = raw.get("moon3rt") or {}
    size = pre.get("size") or {}
    if not isinstance(size, dict):
        raise CheckpointError(f"{path}: size must be an object (shortest_edge, longest_edge), got {size!r}")
    for key, fallback in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if cfg.flavour in ("gme", "ume-r1") or key in runtime:  # their own code passes the limits (config.py)
            continue
        value = pre.get(key, size.get(fallback, getattr(cfg, key)))
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
        setattr(cfg, key, value)
    return tuple(mean), tuple(std)


def load(model: str | os.PathLike = "moon3-tiny", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, backend: str = "torch", flavour: str | None = None,
         seed: int = 0, reasoning: bool | None = None) -> Encoder:
    """Load a preset (random weights, see `Moon3Config.from_name`) or a checkpoint directory.

    device: default CUDA when present, else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
    flavour: override the checkpoint's detected recipe ("moon3", "gme", "ume-r1", "qwen2-vl").
    reasoning: whether `encode` reasons before it embeds by default (None: the checkpoint's
    ``moon3.reasoning.enabled``, false when absent). A model that cannot reason still loads;
    `encode(reasoning=True)` says why it cannot.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = os.fspath(model)
    if (name == "moon3-tiny" and device.type != "meta" and not Path(name).is_dir()
            and (TRAINED_DEFAULT / "model.safetensors").exists()):
        return _load_directory(TRAINED_DEFAULT, name, device, dtype, backend, flavour, reasoning)
    if name in PRESETS and not Path(name).is_dir():
        cfg = Moon3Config.from_name(name)
        if flavour is not None:
            cfg.flavour = flavour
            cfg.validate()
        net = random_model(cfg, seed=seed, device=device, dtype=dtype)
        return Encoder(net, load_tokenizer(TINY_TOKENIZER), device, dtype, backend, name, reasoning=reasoning)
    directory = Path(name)
    if not directory.is_dir():
        raise ValueError(f"model {name!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint directory")
    return _load_directory(directory, name, device, dtype, backend, flavour, reasoning)


def _load_directory(directory: Path, name: str, device, dtype, backend, flavour, reasoning) -> Encoder:
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory}: no tokenizer.json")
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    net = load_model(directory, dtype=dtype, device=device, flavour=flavour or _tokenizer_flavour(directory, tokenizer))
    raw = json.loads((directory / "config.json").read_text())
    mean, std = _preprocessor_overrides(directory, net.cfg, raw)
    net.cfg.validate()
    generation = None
    if net.cfg.flavour == "ume-r1":
        generation = ume_r1.Generation.from_file(directory / "generation_config.json")
    try:  # the tokenizer must suit the config: found here, not as a failure of every item later
        return Encoder(net, tokenizer, device, dtype, backend, name, mean, std, reasoning=reasoning,
                       generation=generation)
    except TokenizerError as err:
        raise CheckpointError(f"{directory / 'tokenizer.json'}: {err}") from None


def _tokenizer_flavour(directory: Path, tokenizer) -> str | None:
    """The flavour config.json and the tokenizer's tokens tell together (UME-R1 is known by
    its two added tokens); None leaves the choice to config.json (its ``moon3rt.flavour``
    first), or to `load_model`'s error when config.json is missing or unreadable."""
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    runtime = raw.get("moon3rt") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or (isinstance(runtime, dict) and runtime.get("flavour")):
        return None
    return detect_flavour(raw, [tok for tok in UME_R1_TOKENS if tokenizer.token_to_id(tok) is not None])


_CACHE: dict[tuple, Encoder] = {}
_CACHE_LOCK = threading.Lock()


def encode(items: Iterable[Any], model: str | os.PathLike = "moon3-tiny", device=None, dtype=None,
           backend: str = "torch", **kwargs) -> np.ndarray:
    """One-off `load(model).encode(items, **kwargs)` with the encoder cached per model/device/dtype/backend."""
    key = (os.fspath(model), str(device), str(dtype), backend)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load(model, device=device, dtype=dtype, backend=backend)
        encoder = _CACHE[key]
    return encoder.encode(items, **kwargs)

