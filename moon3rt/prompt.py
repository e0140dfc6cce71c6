"""Text side of preprocessing: the chat template, tokenisation and M-RoPE positions.

Every item becomes one prompt (DESIGN.md, "Prompt")::

    <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>*n<|vision_end|>   (once per image, images first)
    {title}<|im_end|>\\n<|im_start|>assistant\\n{pool token}

The pool token is ``<emb>`` (``moon3.embed_token_id``) for ``emb_token`` pooling and
``<|endoftext|>`` otherwise, which is exactly GME's published template.

Reasoning mode (``moon3.reasoning``, docs/MODEL.md) asks for the attributes and lets the
model write them before ``<emb>``; the prompt it prefills is::

    ... {title}{reasoning.prompt}<|im_end|>\n<|im_start|>assistant\n{start_marker}\n

and `ReasoningPlan` holds the token rules of the generation that follows.

UME-R1 checkpoints (flavour ``ume-r1``, docs/MODEL.md) use one prompt for both modes::

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
    <|vision_start|><|image_pad|>*n<|vision_end|>   (once per image; a white one if none)
    {ume_r1.user_text(text)}\n<disc_emb>\n{ume_r1.GENERATION_PROMPT}<|im_end|>\n<|im_start|>assistant\n

direct mode pools ``<disc_emb>``; reasoning mode generates from the end of the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field

import numpy as np
import tokenizers

from . import ume_r1
from .config import Moon3Config
from .images import PatchifiedImage

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")


END_OF_TEXT = ("<|im_end|>", "<|endoftext|>")  # tokens that end generation besides the end marker


class TextTooLongError(ValueError):
    """A title longer than `max_text_tokens` with truncation turned off."""


@dataclass
class PreparedItem:
    """One item, tokenised and patchified, ready to be packed into a batch."""

    input_ids: np.ndarray  # (L,) int64
    position_ids: np.ndarray  # (3, L) int64
    title_positions: np.ndarray  # (n_title,) int64, local indices of the title tokens
    pool_position: int  # local index of the pooling token
    images: list[PatchifiedImage] = field(default_factory=list)
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return sum(img.num_patches for img in self.images)

    @property
    def cost(self) -> int:
        """What the item costs a batch's token budget: decoder tokens plus vision patches."""
        return self.num_tokens + self.num_patches


@dataclass(frozen=True)
class ReasoningPlan:
    """Token-level rules of reasoning mode for one model and tokenizer (docs/MODEL.md).

    Greedy decoding stops at a token of `stop_ids` or after `max_tokens` generated tokens;
    the reasoning text is what was generated, less a final stop token; `close_ids`
    (``{end_marker}\\n<emb>``) follow it, and the state at their last token (``<emb>``) is
    pooled. `suppressed_ids` are never generated: they stand for image features, not text.

    UME-R1 (`pool_id` set, no `close_ids`): nothing follows the generated tokens; the state
    pooled is the one at the last generated `pool_id` (``<gen_emb>``), or, when none was
    generated or the last one is the final generated token (so never fed back), the state
    at the last token fed to the model.
    """

    max_tokens: int
    end_marker_id: int | None  # None: no end marker (UME-R1 stops at end of text only)
    stop_ids: tuple[int, ...]  # the end marker first, then end-of-text ids
    close_ids: tuple[int, ...]
    suppressed_ids: tuple[int, ...]
    pool_id: int | None = None  # the generated token whose state is pooled (UME-R1's <gen_emb>)

    def with_budget(self, max_tokens: int) -> "ReasoningPlan":
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be an integer >= 0, got {max_tokens!r}")
        return dataclasses.replace(self, max_tokens=max_tokens)


class TokenizerError(ValueError):
    """A tokenizer that cannot be read, or that does not suit the model's config."""


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        raise TokenizerError(f"cannot read tokenizer {path}: {err}") from None


class PromptBuilder:
    """Turns (title, patchified images) into a `PreparedItem` for one model config."""

    def __init__(self, cfg: Moon3Config, tokenizer: tokenizers.Tokenizer,
                 generation: ume_r1.Generation | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIALS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special tokens {missing} that the prompt template needs")
        # A special token that is only ordinary vocabulary (not an added token) is split by
        # BPE inside the template, so no image placeholder would survive: refuse it here.
        split = [tok for tok, i in ids.items() if tokenizer.encode(tok, add_special_tokens=False).ids != [i]]
        if split:
            raise TokenizerError(f"tokenizer does not keep {split} as single tokens (they must be added special "
                             "tokens, as in Qwen2-VL's tokenizer.json); the prompt template needs them whole")
        for key, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ):
            if getattr(cfg, key) != ids[tok]:
                raise TokenizerError(
                    f"config {key}={getattr(cfg, key)} but the tokenizer gives {tok} the id {ids[tok]}"
                )
        self.image_pad_id = ids["<|image_pad|>"]
        if tokenizer.get_vocab_size() > cfg.text.vocab_size:  # an id past the embedding table would crash mid-batch
            raise TokenizerError(
                f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                f"{cfg.text.vocab_size}: they do not belong together"
            )
        if cfg.flavour == "ume-r1":
            ume_ids = {tok: tokenizer.token_to_id(tok) for tok in (ume_r1.DISC_EMB, ume_r1.GEN_EMB)}
            missing = [tok for tok, i in ume_ids.items() if i is None]
            if missing:
                raise ValueError(f"flavour 'ume-r1' needs the tokens {missing} in the tokenizer, which lacks them")
            self.pool_token, self.pool_id = ume_r1.DISC_EMB, ume_ids[ume_r1.DISC_EMB]
            self.gen_emb_id = ume_ids[ume_r1.GEN_EMB]
            self.generation = generation or ume_r1.Generation()
            if not self.generation.stop_ids:  # Qwen2-VL's end-of-text ids
                self.generation = dataclasses.replace(
                    self.generation, stop_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]))
        elif cfg.pooling == "emb_token":
            self.pool_token = tokenizer.id_to_token(cfg.moon3.embed_token_id)
            if self.pool_token is None:
                raise TokenizerError(f"moon3.embed_token_id={cfg.moon3.embed_token_id} is not in the tokenizer")
            self.pool_id = cfg.moon3.embed_token_id
        else:
            self.pool_token = "<|endoftext|>"
            self.pool_id = ids["<|endoftext|>"]
        self.merge = cfg.vision.spatial_merge_size
        self.title_tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self.title_tokenizer.encode_special_tokens = True

    def reasoning_problems(self) -> list[str]:
        """Why the config and tokenizer cannot run reasoning mode (empty when they can)."""
        problems = self.cfg.reasoning_problems()
        if self.cfg.flavour == "ume-r1":
            return problems  # its tokens were checked when the builder was made
        marker = self.cfg.reasoning.end_marker
        if self.tokenizer.token_to_id(marker) is None:
            problems.append(f"moon3.reasoning.end_marker={marker!r} is not one token of the tokenizer")
        return problems

    def reasoning_plan(self) -> ReasoningPlan:
        """The generation rules of reasoning mode; `ValueError` naming every reason it cannot run."""
        problems = self.reasoning_problems()
        if problems:
            raise ValueError("this model cannot run reasoning mode: " + "; ".join(problems))
        cfg, tok, r = self.cfg, self.tokenizer, self.cfg.reasoning
        if cfg.flavour == "ume-r1":  # the checkpoint's own generation settings; nothing suppressed
            return ReasoningPlan(max_tokens=self.generation.max_new_tokens, end_marker_id=None,
                                 stop_ids=self.generation.stop_ids, close_ids=(), suppressed_ids=(),
                                 pool_id=self.gen_emb_id)
        end_id = tok.token_to_id(r.end_marker)
        stops = [end_id] + [i for i in (cfg.eos_token_id, *map(tok.token_to_id, END_OF_TEXT)) if i is not None]
        close = tok.encode(f"{r.end_marker}\n", add_special_tokens=False).ids + [cfg.moon3.embed_token_id]
        return ReasoningPlan(
            max_tokens=r.max_tokens,
            end_marker_id=end_id,
            stop_ids=tuple(dict.fromkeys(stops)),
            close_ids=tuple(close),
            suppressed_ids=tuple(dict.fromkeys((cfg.image_token_id, cfg.video_token_id))),
        )

    def shortest_prompt(self, reasoning: bool = False) -> int:
        """Positions of the shortest prompt: no image and a one-token title."""
        head_ids, tail_ids = self._template_ids(0, reasoning)
        return len(head_ids) + 1 + len(tail_ids)

    def budget_problem(self, plan: ReasoningPlan) -> str | None:
        """Why the plan's reasoning budget cannot fit the model's positions even for the
        shortest prompt (plus the closing tokens), or None."""
        limit = self.cfg.text.max_position_embeddings
        shortest, closing = self.shortest_prompt(reasoning=True), len(plan.close_ids)
        if shortest + plan.max_tokens + closing <= limit:
            return None
        return (f"max_reasoning_tokens={plan.max_tokens} cannot fit this model's positions: the shortest "
                f"reasoning prompt takes {shortest} and the closing tokens {closing}, so "
                f"max_position_embeddings={limit} leaves at most {limit - shortest - closing} tokens to reason")

    @functools.lru_cache(maxsize=64)  # one builder per encoder, alive as long as the encoder
    def _template_ids(self, n_images: int, reasoning: bool) -> tuple[list[int], list[int]]:
        """Token ids of the template around the title, the same for every item with as many images."""
        head = f"<|im_start|>system\n{self.cfg.instruction}<|im_end|>\n<|im_start|>user\n"
        head += "<|vision_start|><|image_pad|><|vision_end|>" * n_images
        if self.cfg.flavour == "ume-r1":  # one prompt for both modes; <disc_emb> sits inside the user turn
            tail = "<|im_end|>\n<|im_start|>assistant\n"
            return (self.tokenizer.encode(head, add_special_tokens=False).ids,
                    self.tokenizer.encode(tail, add_special_tokens=False).ids)
        if reasoning:
            r = self.cfg.reasoning
            tail = f"{r.prompt}<|im_end|>\n<|im_start|>assistant\n{r.start_marker}\n"
        else:
            tail = "<|im_end|>\n<|im_start|>assistant\n"
        head_ids = self.tokenizer.encode(head, add_special_tokens=False).ids
        tail_ids = self.tokenizer.encode(tail, add_special_tokens=False).ids
        if not reasoning:  # the pool token by id: its text need not survive a round trip through BPE
            tail_ids = tail_ids + [self.pool_id]
        return head_ids, tail_ids

    def build(self, title: str | None, images: list[PatchifiedImage], truncate: bool = True,
              reasoning: bool = False) -> PreparedItem:
        """The item's prompt: direct mode ends in the pool token; reasoning mode's is the
        prefix that generation continues (its `pool_position` is its last token)."""
        head_ids, tail_ids = self._template_ids(len(images), reasoning)
        ume = self.cfg.flavour == "ume-r1"
        if ume:  # the authors' user text (ume_r1.user_text) + "\n<disc_emb>\n" + instruction
            title = (title or "").strip() + "\n"
        # The title is user text: special-token strings in it ("<|im_end|>", "<emb>") are
        # ordinary characters, never template structure.
        title_ids = self.title_tokenizer.encode(title or "", add_special_tokens=False).ids
        truncated = False
        if len(title_ids) > self.cfg.max_text_tokens:
            if not truncate:
                raise TextTooLongError(
                    f"title has {len(title_ids)} tokens, more than max_text_tokens={self.cfg.max_text_tokens}"
                )
            title_ids = title_ids[: self.cfg.max_text_tokens]
            truncated = True
        pool_at = None  # index in `ids` of a pool token inside the prompt (UME-R1's <disc_emb>)
        if ume:
            pool_at = len(head_ids) + len(title_ids)
            tail_ids = [self.pool_id, *self._ume_r1_instruction_ids()] + tail_ids
        ids = head_ids + title_ids + tail_ids
        is_title = [False] * len(head_ids) + [True] * len(title_ids) + [False] * len(tail_ids)

        # Expand each <|image_pad|> into the image's merged tokens and lay out positions: a
        # text token takes the next position on all three rope axes; an image takes a block.
        out_ids: list[int] = []
        title_pos: list[int] = []
        pos_rows: list[np.ndarray] = []
        cur = 0  # position of the next token
        run = 0  # text tokens since the last image, whose positions are cur - run .. cur - 1
        image_iter = iter(images)
        pool_position = None
        for at, (tok, in_title) in enumerate(zip(ids, is_title)):
            if at == pool_at:
                pool_position = len(out_ids)
            if tok == self.image_pad_id and not in_title:
                if run:
                    pos_rows.append(np.broadcast_to(np.arange(cur - run, cur), (3, run)))
                    run = 0
                _, gh, gw = next(image_iter).grid_thw
                mh, mw = gh // self.merge, gw // self.merge
                out_ids.extend([tok] * (mh * mw))
                if self.cfg.uses_mrope:
                    rows, cols = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
                    block = np.stack([np.zeros(mh * mw, np.int64), rows.ravel(), cols.ravel()]) + cur
                    pos_rows.append(block)
                    cur += max(mh, mw)
                else:
                    pos_rows.append(np.broadcast_to(np.arange(cur, cur + mh * mw), (3, mh * mw)))
                    cur += mh * mw
                continue
            if in_title:
                title_pos.append(len(out_ids))
            out_ids.append(tok)
            cur += 1
            run += 1
        if run:
            pos_rows.append(np.broadcast_to(np.arange(cur - run, cur), (3, run)))
        return PreparedItem(
            input_ids=np.asarray(out_ids, dtype=np.int64),
            position_ids=np.concatenate(pos_rows, axis=1).astype(np.int64),
            title_positions=np.asarray(title_pos, dtype=np.int64),
            pool_position=len(out_ids) - 1 if pool_position is None or reasoning else pool_position,
            images=list(images),
            truncated=truncated,
        )

    @functools.lru_cache(maxsize=1)
    def _ume_r1_instruction_ids(self) -> list[int]:
        """"\\n" + GENERATION_PROMPT, tokenised as the authors' processor does (added tokens
        such as <gen_emb> inside it are tokens)."""
        return self.tokenizer.encode("\n" + ume_r1.GENERATION_PROMPT, add_special_tokens=False).ids

    def count_title_tokens(self, title: str) -> int:
        """Tokens the title takes in a prompt (special-token strings count as plain text)."""
        return len(self.title_tokenizer.encode(title, add_special_tokens=False).ids)

