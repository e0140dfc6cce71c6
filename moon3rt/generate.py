"""Reasoning mode: batched greedy generation over a preallocated KV cache, then ``<emb>``.

MOON3 writes the attributes a shopper cares about before it embeds (DESIGN.md,
"Reasoning mode"; docs/MODEL.md). For a packed batch of reasoning prompts
(`PromptBuilder.build(..., reasoning=True)`) and a `ReasoningPlan`:

1. Prefill: the packed batch runs once through the model exactly as in direct mode
   (vision tower, FIRE on the image tokens, causal attention within each item), and each
   decoder layer's rotated keys and values go into the cache. The final-norm state at an
   item's last prompt token gives its first greedy token.
2. Decode: each step feeds one token per unfinished item: its last greedy token while it
   reasons; once it has stopped (end marker, end of text, or `max_tokens` generated), the
   closing tokens ``{end_marker}\\n<emb>`` one by one, ignoring its logits. Items stop at
   different steps and decode on together.
3. The state at the step that fed ``<emb>`` is the item's pooled vector, and the item leaves
   the batch. MHMF (image tokens and title tokens only, never the generated text) and the
   projection follow, as in direct mode.

A plan with a `pool_id` and no closing tokens (UME-R1, docs/MODEL.md) feeds nothing after
the stop: an item leaves the batch when it stops, its stop token (or the token that used up
its budget) never fed, and its pooled vector is the state at the last generated `pool_id`
(``<gen_emb>``) if that token was fed back, else the state at the last token fed.

The cache (`KVCache`) is allocated once per batch as k, v of shape
(layers, max_items, max_len, Hk, D), max_len = longest prompt + max_tokens + closing
tokens: slot b is item b's for the whole batch. A step takes the active items' `slots`
and `lengths` (A,), writes the new token's k/v at position lengths[a] and attends over
lengths[a] + 1 keys; an item leaving the batch moves nothing. Shapes depend on
(A, max_items, max_len) only, so on a GPU a step could be captured in a CUDA graph per
active-count bucket (not done yet: the host reads each step's greedy tokens).

Positions: a generated token continues its item, at 1 + the largest position the item
has used, on all three M-RoPE rows (how Qwen2-VL continues after images); sequential 1-D
positions (GME) continue the same way. The closing tokens continue likewise.

Sampling (`moon3rt.sampling`, for reinforcement learning; docs/RL.md): with a `Sampling`,
each token is drawn at a temperature within a nucleus instead of taken greedily, and
`rollouts` = G continuations of every item share its prefill: the prompt runs once, its
cached keys and values are copied into G slots, and the G rows decode on as separate
items (rows b*G .. b*G+G-1 are item b's). Rollouts cost decode steps, not prefills.

A decoder is anything with the three methods `TorchDecoder` has: `TorchDecoder` is the
plain-torch step, the oracle, and `TritonBackend` implements them with its fused kernels
and `kernels.decode_attention`. `generate_naive` reruns the whole sequence at every step
with the reference model: the equivalence check for the cache, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TextConfig
from .kernels.decode_attention import decode_attention_ref
from .model import Moon3Model, PackedBatch, segments
from .prompt import ReasoningPlan
from .sampling import Sampler, Sampling, masked_logits


@dataclass
class KVCache:
    """Keys and values of every item's tokens so far, one slot per item of the batch."""

    k: torch.Tensor  # (layers, max_items, max_len, Hk, D), rotated keys
    v: torch.Tensor  # (layers, max_items, max_len, Hk, D)

    @staticmethod
    def bytes_per_position(cfg: TextConfig, dtype: torch.dtype) -> int:
        """Bytes of k and v for one position of one item, over all layers."""
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    @classmethod
    def allocate(cls, cfg: TextConfig, max_items: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> "KVCache":
        shape = (cfg.num_hidden_layers, max_items, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def prefill_sink(self, cu_seqlens: torch.Tensor, rollouts: int = 1):
        """A `kv_sink(layer, k, v)` that scatters a packed batch's k/v (T, Hk, D) into the slots:
        item b's into slot b * rollouts (`fork` then copies it to the item's other rollouts)."""
        cu = cu_seqlens.to(self.k.device, torch.int64)
        lengths = cu[1:] - cu[:-1]
        item = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
        offset = torch.arange(item.numel(), device=cu.device) - cu[item]
        slot = item * rollouts

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[layer, slot, offset] = k
            self.v[layer, slot, offset] = v

        return sink

    def fork(self, rollouts: int) -> None:
        """Copy slot b * rollouts into slots b * rollouts + 1 .. (b + 1) * rollouts - 1, every b."""
        if rollouts > 1:
            for cache in (self.k, self.v):
                groups = cache.view(cache.shape[0], -1, rollouts, *cache.shape[2:])
                groups[:, :, 1:] = groups[:, :, :1]


class TorchDecoder:
    """Prefill, decode step and heads of the reference model, in plain torch (the oracle)."""

    name = "torch"

    def __init__(self, model: Moon3Model, device: torch.device):
        self.model, self.device = model, device

    def hidden_states(self, batch: PackedBatch, kv_sink=None):
        return self.model.hidden_states(batch.to(self.device), kv_sink)

    def heads(self, e: torch.Tensor, v: torch.Tensor | None, batch: PackedBatch) -> torch.Tensor:
        return self.model.heads(e, v, batch.to(self.device))

    def decode_step(self, tokens, positions, slots, lengths, cache: KVCache) -> torch.Tensor:
        """One token per active item: tokens (A,), positions (3, A), slots (A,), lengths (A,)
        tokens already cached per item. Returns final-norm states (A, d); writes the cache."""
        lm = self.model.language_model
        h = lm.embed_tokens(tokens)
        cos, sin = lm.rotary(positions, h.dtype)
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            q, k, v = attn.rotated_qkv(layer.input_layernorm(h), cos, sin)
            cache.k[i, slots, lengths] = k
            cache.v[i, slots, lengths] = v
            o = decode_attention_ref(q, cache.k[i], cache.v[i], slots, lengths + 1)
            h = h + attn.o_proj(o.reshape(h.shape[0], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return lm.norm(h)


def decoder_for(backend) -> "TorchDecoder":
    """The decoder reasoning mode uses with `backend` (an object of `moon3rt.backends`)."""
    if backend.name == "torch":
        return TorchDecoder(backend.model, backend.device)
    if hasattr(backend, "decode_step"):
        return backend
    raise ValueError(f"backend {backend.name!r} has no decode path; reasoning mode runs on backend='torch' or 'triton'")


def greedy_tokens(lm_weight: torch.Tensor, h: torch.Tensor, plan: ReasoningPlan) -> torch.Tensor:
    """argmax of the logits h @ W^T (in h's dtype), never a suppressed id; first index on ties. (n,) int64."""
    logits = F.linear(h, lm_weight).float()
    if plan.suppressed_ids:
        logits[:, list(plan.suppressed_ids)] = float("-inf")
    return logits.argmax(dim=-1)


@dataclass
class Reasoned:
    """What reasoning mode produced for a batch: one row per item in batch order (with
    `rollouts` G, G rows per item, item b's at rows b*G .. b*G+G-1)."""

    vectors: torch.Tensor  # (rows, out) fp32, un-normalised: MHMF + projection of the <emb> states
    tokens: list[list[int]]  # each row's reasoning tokens (a final stop token left out)
    stops: list[str]  # why each item stopped: "end_marker", "eos" or "budget"
    steps: int  # decode steps run for the batch
    # each row's drawn tokens: its reasoning tokens, then the stop token it drew (none on "budget")
    sampled: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None  # with a `Sampling`: log-probs of `sampled` (moon3rt.sampling)


class _Item:
    """One item's generation state: reasoning until `closing` is set, then feeding it."""

    def __init__(self, length: int, next_position: int):
        self.length, self.position = length, next_position  # tokens cached; position of the next token
        self.tokens: list[int] = []
        self.sampled = 0
        self.next_input: int | None = None
        self.closing: list[int] | None = None  # [] once done: nothing left to feed
        self.stop = "budget"
        self.pool_fed = False  # plan.pool_id was fed back (UME-R1)

    def take(self, token: int, plan: ReasoningPlan) -> None:
        """Greedy `token` was generated: continue, or stop and queue the closing tokens."""
        self.sampled += 1
        if token in plan.stop_ids:
            self.stop = "end_marker" if token == plan.end_marker_id else "eos"
            self.closing = list(plan.close_ids)  # the stop token itself becomes "{end_marker}"
        elif self.sampled >= plan.max_tokens:
            self.tokens.append(token)
            self.closing = [token, *plan.close_ids] if plan.close_ids else []
        else:
            self.tokens.append(token)
            self.next_input = token


@torch.inference_mode()
def generate(decoder, batch: PackedBatch, plan: ReasoningPlan, lm_weight: torch.Tensor,
             sampling: Sampling | None = None, rollouts: int = 1) -> Reasoned:
    """Reason, then embed, for every item of a packed batch of reasoning prompts.

    Greedy without `sampling` (the inference default). With it, `rollouts` sampled
    continuations per item share the item's prefill; the result has B * rollouts rows,
    item b's rollouts at rows b * rollouts .. (b + 1) * rollouts - 1, with `logprobs`.
    """
    if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 1:
        raise ValueError(f"rollouts must be an integer >= 1, got {rollouts!r}")
    if rollouts > 1 and sampling is None:
        raise ValueError("rollouts > 1 needs a Sampling: greedy rollouts of one prompt are all the same")
    device, text = decoder.device, decoder.model.cfg.text
    bounds = segments(batch.cu_seqlens)
    positions = batch.position_ids
    items = [_Item(end - start, int(positions[:, start:end].max()) + 1) for start, end in bounds
             for _ in range(rollouts)]
    max_len = max(it.length for it in items) + plan.max_tokens + len(plan.close_ids)
    dtype = decoder.model.language_model.embed_tokens.weight.dtype
    cache = KVCache.allocate(text, len(items), max_len, dtype, device)
    sampled: list[list[int]] = [[] for _ in items]
    logprobs: list[list[float]] | None = None if sampling is None else [[] for _ in items]
    sampler = None if sampling is None else Sampler(sampling, len(items), device)

    def draw(states: torch.Tensor, rows: list[int]) -> list[int]:
        """The next token of each row (greedy, or drawn by the sampler), recorded per row."""
        if sampler is None:
            tokens = greedy_tokens(lm_weight, states, plan).tolist()
        else:
            chosen, logp = sampler(masked_logits(lm_weight, states, plan.suppressed_ids), rows)
            tokens = chosen.tolist()
            for row, lp in zip(rows, logp.tolist()):
                logprobs[row].append(lp)
        for row, token in zip(rows, tokens):
            sampled[row].append(token)
        return tokens

    h, v = decoder.hidden_states(batch, kv_sink=cache.prefill_sink(batch.cu_seqlens, rollouts))
    cache.fork(rollouts)
    last = torch.tensor([end - 1 for _, end in bounds], device=h.device)
    first = h[last].repeat_interleave(rollouts, dim=0) if rollouts > 1 else h[last]
    if plan.max_tokens > 0:
        for it, token in zip(items, draw(first, list(range(len(items))))):
            it.take(token, plan)
    else:
        for it in items:
            it.closing = list(plan.close_ids)

    pooled = torch.empty(len(items), text.hidden_size, dtype=dtype, device=device)
    # UME-R1: the state at the last token fed (the prompt's last, so far) and at the last fed pool_id
    fed_last = first.clone() if plan.pool_id is not None else None
    fed_pool = torch.empty_like(fed_last) if fed_last is not None else None
    del h

    def finish(b: int) -> None:  # an item of a pool_id plan has stopped: choose its state
        it = items[b]
        unfed = it.stop == "budget" and it.tokens[-1:] == [plan.pool_id]  # the budget ran out on it
        pooled[b] = fed_pool[b] if it.pool_fed and not unfed else fed_last[b]

    active = []
    for b, it in enumerate(items):
        if it.closing == []:
            finish(b)
        else:
            active.append(b)
    steps = 0
    while active:
        feed = [items[b].closing.pop(0) if items[b].closing is not None else items[b].next_input for b in active]
        step_positions = torch.tensor([items[b].position for b in active], device=device).expand(3, -1)
        states = decoder.decode_step(
            torch.tensor(feed, device=device), step_positions, torch.tensor(active, device=device),
            torch.tensor([items[b].length for b in active], device=device), cache,
        )
        steps += 1
        reasoning_rows, still = [], []
        for row, b in enumerate(active):
            it = items[b]
            it.length += 1
            it.position += 1
            if it.closing is None:
                reasoning_rows.append(row)
                still.append(b)
                if fed_last is not None and feed[row] == plan.pool_id:
                    fed_pool[b], it.pool_fed = states[row], True
            elif it.closing:
                still.append(b)
            else:  # it has just fed <emb>
                pooled[b] = states[row]
        if fed_last is not None and reasoning_rows:
            fed_last[[active[row] for row in reasoning_rows]] = states[reasoning_rows]
        if reasoning_rows:
            tokens = draw(states[reasoning_rows], [active[row] for row in reasoning_rows])
            for row, token in zip(reasoning_rows, tokens):
                items[active[row]].take(token, plan)
                if items[active[row]].closing == []:  # stopped with nothing to feed (UME-R1)
                    finish(active[row])
                    still.remove(active[row])
        active = still

    if rollouts == 1:
        vectors = decoder.heads(pooled, v, batch)
    else:  # rollout g of every item, as one batch of the original items
        vectors = torch.stack([decoder.heads(pooled[g::rollouts], v, batch) for g in range(rollouts)], dim=1)
        vectors = vectors.flatten(0, 1)
    return Reasoned(vectors, [it.tokens for it in items], [it.stop for it in items], steps, sampled, logprobs)


def _extend(batch: PackedBatch, new_tokens: list[int], next_position: int) -> PackedBatch:
    """A one-item batch with `new_tokens` appended at consecutive positions; pools the last token."""
    ids = torch.cat([batch.input_ids, torch.tensor(new_tokens, dtype=torch.int64, device=batch.input_ids.device)])
    pos = torch.arange(next_position, next_position + len(new_tokens), device=batch.position_ids.device)
    length = ids.numel()
    return PackedBatch(
        input_ids=ids,
        position_ids=torch.cat([batch.position_ids, pos.expand(3, -1)], dim=1),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32, device=batch.cu_seqlens.device),
        pool_index=torch.tensor([length - 1], device=batch.pool_index.device),
        title_index=batch.title_index, cu_titles=batch.cu_titles, cu_images=batch.cu_images,
        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, pixel_norm=batch.pixel_norm,
    )


@torch.inference_mode()
def generate_naive(model: Moon3Model, batch: PackedBatch, plan: ReasoningPlan) -> tuple[list[int], str, torch.Tensor]:
    """Reasoning mode without a cache, for tests: every step reruns the whole sequence.

    batch holds one reasoning prompt. Returns (reasoning tokens, stop reason, vector (out,)
    fp32 un-normalised): the vector is `model` run on prompt + reasoning + closing tokens,
    which is direct mode's forward on the full sequence.
    """
    if batch.num_items != 1:
        raise ValueError(f"generate_naive takes one item, got a batch of {batch.num_items}")
    if plan.pool_id is not None:
        raise ValueError("generate_naive follows the closing-token rule; a pool_id plan is checked against transformers")
    weight = model.output_embeddings()
    next_position = int(batch.position_ids.max()) + 1
    tokens: list[int] = []
    stop = "budget"
    for _ in range(plan.max_tokens):
        h, _ = model.hidden_states(_extend(batch, tokens, next_position))
        token = int(greedy_tokens(weight, h[-1:], plan))
        if token in plan.stop_ids:
            stop = "end_marker" if token == plan.end_marker_id else "eos"
            break
        tokens.append(token)
    vector = model(_extend(batch, tokens + list(plan.close_ids), next_position))[0]
    return tokens, stop, vector
