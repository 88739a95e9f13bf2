"""Prefix-shared packing of preference pairs: one segment [prompt | chosen | rejected | gt] per pair.

The plain DPO forward (AVProcessor.collate_preference) holds each response as its own padded sequence, so the
long audio-visual prompt is computed 2-3 times per pair (4-5 with a reference pass). Here every pair becomes ONE
segment in which the prompt appears once, and each response sees only that prompt and its own past:

- positions: each response's 3-D M-RoPE ids restart right after the prompt, i.e. they are the ids that response
  has in its own unpacked sequence (copied from the collated batch), so every response token computes exactly
  what it computes in the plain path;
- attention: a prompt token is causal within its own prompt; a response token sees its pair's prompt and its own
  response's past; a padding token sees only itself (no empty softmax rows, no NaN);
- log-probs: token j > 0 of a response is predicted by the hidden state before it, token 0 of EVERY response by
  the last prompt token of its pair (that hidden state serves chosen, rejected and gt). The flat
  (hidden index, target) pairs go to AVLLM(logp_index=, logp_targets=), which runs the LM head on those rows only.

Rows: segments are packed greedily IN PAIR ORDER (next-fit) into rows of at most ``pack_tokens`` tokens, padded
at the tail only. Pair order is kept because AVLLM scatters the media features into the placeholders in
row-major order, which must stay the samples' order; first-fit would reorder the pairs and with them the media.
A pair longer than ``pack_tokens`` gets a row of its own (never an error: the budget is about padding and mask
size, not a hard limit). ``pack_tokens=None`` puts every pair in its own row.

Cost: the dense mask is (r, 1, L, L) additive float (one tensor per rows, shared by every layer), for SDPA/eager
(on CPU). SDPA with a dense mask computes every
query-key block, so several pairs in one row cost more attention FLOPs than one row per pair; FlexAttention's
BlockMask (``attention_mask(..., "flex_attention")``, CUDA) skips the blocks between pairs, which is where
packing several pairs per row pays. ``attention_mask(..., SPLIT_SDPA)`` (src.models.split_attention) gives SDPA
the rows' shared prompt prefix as "causal", its flash kernel, and a mask for the queries after it only.

``PrefixBatch`` / ``prefix_batch`` (DPOModule ``prefix_sharing="cache"``) share the prompt
through the KV cache instead: the b prompts in one causal pass with a cache, then one row per pair
[chosen | rejected | gt] on that cache, with a (k R x (P + k R)) mask (no prompt x prompt block); the same split
(``_split_pair``), positions and targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from src.losses.logprobs import IGNORE_INDEX
from src.models.split_attention import NAME as SPLIT_SDPA
from src.models.split_attention import SplitMask

PROMPT = 0  # part id of prompt tokens; response j (0 chosen, 1 rejected, 2 gt) has part id j + 1
PADDING = -1  # pair and part id of padding tokens


@dataclass
class PackedPairs:
    """b pairs with k responses each, packed into r rows of L tokens.

    input_ids (r, L); position_ids (3, r, L); pair (r, L): the pair index of each token, PADDING at the tail;
    part (r, L): PROMPT or response index + 1, PADDING at the tail.
    logp_index (N,): flat index into the (r * L) hidden states that predicts each labelled response token;
    logp_targets (N,): that token; logp_segment (N,): response * b + pair, to sum per (response, pair).
    rows: the pair indices in each row, in order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair: torch.Tensor
    part: torch.Tensor
    logp_index: torch.Tensor
    logp_targets: torch.Tensor
    logp_segment: torch.Tensor
    pairs: int
    responses: int
    rows: list[list[int]]
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    def dense_mask(self, start: int = 0) -> torch.Tensor:
        """(r, 1, L - start, L) bool, True = attend (the SDPA convention; transformers passes a 4-D mask through):
        the rows of the queries from ``start`` on (all by default)."""
        pair_q, pair_k = self.pair[:, start:, None], self.pair[:, None, :]
        part_q, part_k = self.part[:, start:, None], self.part[:, None, :]
        cols = torch.arange(self.pair.shape[1], device=self.pair.device)
        rows = cols[start:, None]
        visible = (pair_q == pair_k) & (pair_q != PADDING) & (cols[None, :] <= rows)
        visible &= (part_k == PROMPT) | (part_k == part_q)
        return (visible | (cols[None, :] == rows)).unsqueeze(1)

    def shared_prefix(self) -> int:
        """The length of the shortest first prompt over the rows: tokens [0, prefix) of every row are one prompt,
        causal among themselves (src.models.split_attention)."""
        leading = (self.part == PROMPT).int().cumprod(dim=1).sum(dim=1)
        return int(leading.min())

    def split_mask(self, dtype: torch.dtype) -> SplitMask:
        """The mask as a SplitMask: the shared prefix causal, an additive mask for the queries after it."""
        prefix = self.shared_prefix()
        return SplitMask(prefix, additive(self.dense_mask(prefix), dtype))

    def mask_mod(self):
        """The mask as a FlexAttention mask_mod over (row, head, query, key) indices, read from the pair / part
        ids: the same rule as ``dense_mask``."""
        pair, part = self.pair, self.part

        def mask_mod(b, h, q, kv):
            same = (pair[b, q] == pair[b, kv]) & (pair[b, q] != PADDING)
            seen = (part[b, kv] == PROMPT) | (part[b, kv] == part[b, q])
            return (same & seen & (kv <= q)) | (q == kv)

        return mask_mod

    def block_mask(self):
        """The mask as a FlexAttention BlockMask: built block by block from ``mask_mod``, never an (L, L) tensor per
        row; blocks that no query of a pair can see (between pairs, between responses) are skipped by the kernel."""
        from torch.nn.attention.flex_attention import create_block_mask

        r, length = self.pair.shape
        return create_block_mask(self.mask_mod(), B=r, H=None, Q_LEN=length, KV_LEN=length, device=self.pair.device)

    def attention_mask(self, implementation: str, dtype: torch.dtype = torch.float32):
        """The mask in the form ``implementation`` (the LLM config's _attn_implementation) takes: sdpa and eager ->
        additive float (0 / dtype min, in the model's ``dtype``), flex_attention -> BlockMask, SPLIT_SDPA -> a
        SplitMask for every layer type (src.models.split_attention). Built once per
        (implementation, dtype) and kept: every layer of every pass over these rows reads the SAME tensor. (A bool
        mask would be turned into a float one by SDPA at every layer call, one (r, 1, L, L) copy per layer kept
        for backward.)"""
        key = (implementation, dtype)
        if key not in self._masks:
            self._masks[key] = self._build_mask(implementation, dtype)
        return self._masks[key]

    def _build_mask(self, implementation: str, dtype: torch.dtype):
        if implementation == SPLIT_SDPA:
            return self.split_mask(dtype).layer_masks()
        return mask_in_form(implementation, dtype, self.dense_mask, self.block_mask)

    def model_inputs(self, implementation: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """input_ids, position_ids and the mask for AVLLM (media_repeats stays 1: each prompt appears once)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": self.attention_mask(implementation, dtype)}

    def logp_inputs(self, responses: int | None = None) -> dict[str, torch.Tensor]:
        """logp_index / logp_targets of the first ``responses`` responses (all by default)."""
        keep = self.entries(responses)
        return {"logp_index": self.logp_index[keep], "logp_targets": self.logp_targets[keep]}

    def entries(self, responses: int | None = None) -> torch.Tensor:
        """(N,) bool: the log-prob entries that belong to the first ``responses`` responses."""
        return self.logp_segment < (self.responses if responses is None else responses) * self.pairs

    def response_sums(self, token_logps: torch.Tensor, responses: int | None = None) -> torch.Tensor:
        """(k, b) SUM of the token log-probs of each (response, pair); ``token_logps`` holds the entries of the
        first ``responses`` responses (``logp_inputs(responses)``), in order."""
        k = self.responses if responses is None else responses
        segment = self.logp_segment[self.entries(k)]
        sums = torch.zeros(k * self.pairs, dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, segment, token_logps).view(k, self.pairs)

    def response_counts(self) -> torch.Tensor:
        """(k, b) number of scored tokens of each (response, pair)."""
        return torch.bincount(self.logp_segment, minlength=self.responses * self.pairs).view(self.responses,
                                                                                              self.pairs)


def mask_in_form(implementation: str, dtype: torch.dtype, dense, block):
    """A 4-D attention mask in the form ``implementation`` takes: sdpa and eager -> additive float (0 / dtype min)
    in ``dtype`` from ``dense()`` (bool, True = attend), flex_attention -> ``block()`` (a BlockMask)."""
    if implementation == "flex_attention":
        return block()
    if implementation in ("sdpa", "eager", SPLIT_SDPA):  # SPLIT_SDPA hands an ordinary 4-D mask to SDPA
        return additive(dense(), dtype)
    raise ValueError(f"prefix sharing needs an explicit mask; attention implementation {implementation!r} has no "
                     f"4-D mask path here (use sdpa, eager, flex_attention or {SPLIT_SDPA})")


def additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive float one: 0 where seen, dtype's min elsewhere."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, torch.finfo(dtype).min)


def _real(row: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    return row[..., attention.bool()]


def _split_pair(batch: dict, i: int, responses: int) -> dict:
    """Pair i's prompt (ids, positions) and per response (ids, positions, labels) after the prompt. The prompt
    is everything before the first labelled token, and must be identical in every response's sequence."""
    b = batch["has_gt"].shape[0]
    names = batch["responses"]
    prompt, parts = None, []
    for j in range(responses):
        row = j * b + i
        attention = batch["attention_mask"][row]
        ids, labels = _real(batch["input_ids"][row], attention), _real(batch["labels"][row], attention)
        positions = _real(batch["position_ids"][:, row], attention)
        labelled = (labels != IGNORE_INDEX).nonzero()
        if not len(labelled):
            raise ValueError(f"pair {i}: response {names[j]!r} has no labelled tokens (a prompt-only row); "
                             "pack only responses every pair has")
        start = int(labelled[0])
        if start == 0:
            raise ValueError(f"pair {i}: response {names[j]!r} is labelled from its first token: no prompt to share")
        if prompt is None:
            prompt = (ids[:start], positions[:, :start])
        elif start != len(prompt[0]) or not torch.equal(ids[:start], prompt[0]) or \
                not torch.equal(positions[:, :start], prompt[1]):
            raise ValueError(f"pair {i}: response {names[j]!r} has a different prompt from {names[0]!r} "
                             f"({start} vs {len(prompt[0])} tokens before the first label); prefix sharing needs "
                             "one identical prompt per pair")
        parts.append((ids[start:], positions[:, start:], labels[start:]))
    return {"prompt": prompt, "responses": parts}


def pack_rows(lengths: list[int], pack_tokens: int | None) -> list[list[int]]:
    """Greedy next-fit in order: indices of the segments in each row. A segment longer than the budget gets a row
    of its own; None = one segment per row."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if pack_tokens is None or not rows or used + n > pack_tokens:
            rows.append([i])
            used = n
        else:
            rows[-1].append(i)
            used += n
    return rows


def pack_preference(batch: dict, responses: int, pack_tokens: int | None = None,
                    pad_token_id: int = 0) -> PackedPairs:
    """A collated preference batch (src.models.processor.AVProcessor.collate_preference) -> PackedPairs holding the
    first ``responses`` responses of every pair (2: chosen, rejected; 3: + gt). See the module docstring."""
    if pack_tokens is not None and pack_tokens < 1:
        raise ValueError(f"pack_tokens must be >= 1 or None, got {pack_tokens}")
    if responses > len(batch["responses"]):
        raise ValueError(f"asked for {responses} responses, the batch holds {batch['responses']}")
    b = batch["has_gt"].shape[0]
    pairs = [_split_pair(batch, i, responses) for i in range(b)]
    lengths = [len(p["prompt"][0]) + sum(len(r[0]) for r in p["responses"]) for p in pairs]
    rows = pack_rows(lengths, pack_tokens)
    length = max(sum(lengths[i] for i in row) for row in rows)
    device = batch["input_ids"].device
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.ones((3, len(rows), length), dtype=torch.long, device=device)
    pair_ids = torch.full((len(rows), length), PADDING, dtype=torch.long, device=device)
    part_ids = torch.full_like(pair_ids, PADDING)
    index, targets, segment = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            prompt_ids, prompt_positions = pairs[i]["prompt"]
            last_prompt = r * length + col + len(prompt_ids) - 1
            pieces = [(PROMPT, prompt_ids, prompt_positions)] + [
                (j + 1, ids, positions) for j, (ids, positions, _) in enumerate(pairs[i]["responses"])]
            for part, ids, positions in pieces:
                n = len(ids)
                input_ids[r, col:col + n], position_ids[:, r, col:col + n] = ids, positions
                pair_ids[r, col:col + n], part_ids[r, col:col + n] = i, part
                if part != PROMPT:
                    labels = pairs[i]["responses"][part - 1][2]
                    scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)
                    before = r * length + col + scored - 1
                    index.append(torch.where(scored == 0, last_prompt, before))
                    targets.append(labels[scored])
                    segment.append(torch.full_like(scored, (part - 1) * b + i))
                col += n
    return PackedPairs(input_ids=input_ids, position_ids=position_ids, pair=pair_ids, part=part_ids,
                       logp_index=torch.cat(index), logp_targets=torch.cat(targets), logp_segment=torch.cat(segment),
                       pairs=b, responses=responses, rows=rows)


# -- KV-cache prefix sharing ------------------------------------------------------------------------------------

class PrefixCache(DynamicCache):
    """The prompt pass's keys and values for the response pass, in a form activation checkpointing can replay.

    transformers drops a cache from a checkpointed decoder layer, since backward's recompute of the layer would
    append to an ordinary cache a second time. Here every ``update`` is a pure function of its inputs:

    - recording (the prompt pass, which starts empty): a layer's first call stores its keys / values and returns
      them; a later call for the same layer, the recompute, stores nothing and returns its inputs, as the first
      call did (the prompt attends to itself only);
    - ``reader()`` (the response pass): returns the recorded prompt followed by the new tokens and stores
      nothing, so the recompute reads the same prompt.

    The stored tensors stay in the autograd graph: the responses' gradients reach the prompt pass."""

    def __init__(self, prefix: list | None = None):
        super().__init__()
        self.frozen = prefix is not None
        if prefix is not None:
            self.layers = prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen:
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reader(self) -> PrefixCache:
        """A cache for any number of response passes over this prompt (it shares the recorded tensors)."""
        if self.frozen or not self.layers:
            raise ValueError("reader() needs a recording PrefixCache that a prompt pass has filled")
        return PrefixCache(list(self.layers))


@contextmanager
def cache_through_checkpointing(layers) -> Iterator[None]:
    """Let checkpointed decoder layers keep the cache they are given (transformers' ``_can_checkpoint_with_cache``,
    for caches that only read), for passes whose caches are PrefixCaches. The flag is read when a layer runs
    forward; backward's recompute replays that call as it was."""
    layers = list(layers)
    previous = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            if value is None:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = value


@dataclass
class PrefixBatch:
    """b pairs with k responses each, for prefix sharing through the KV cache (no prompt x prompt mask):

    1. prompt pass: the b prompts, right-padded: prompt_ids (b, P), prompt_positions (3, b, P), prompt_mask (b, P)
       (1 = real), media once; it returns the cache and the log-prob of token 0 of every response, predicted by
       the last real prompt token of its pair (prompt_index: that flat index into the b * P hidden states, once per
       response; prompt_targets, prompt_segment);
    2. response pass: ONE row per pair on that cache as it is (never repeated): [response 0 | response 1 | ...],
       response j in the slot of columns j * R .. (j + 1) * R, right-padded inside its slot: response_ids
       (b, k * R), response_positions (3, b, k * R) (each response's own 3-D ids from its unpacked sequence, i.e.
       restarting after the prompt), response_mask (b, k * R) (1 = real). The attention mask (``response_mask_4d``,
       (b, 1, k * R, P + k * R)) lets a response token see its pair's real prompt tokens and its own response's
       past, nothing of the other responses. Token t > 0 of response j is predicted by its token t - 1
       (response_pair, response_col: row and column of that hidden state; response_targets, response_segment).

    Why one row per pair: with a mask, the SDPA path of transformers expands the keys and values to every query
    head (repeat_kv) and keeps them for backward, once per row; k rows per pair would hold k copies of the prompt's.

    Segments are response * b + pair, as in PackedPairs. ``responses`` (<= k) everywhere selects the first
    responses only (the reference pass: chosen and rejected): the first responses * R columns, the entries with
    segment < responses * b. The slots are prefix-closed: no response sees a later slot.
    """

    prompt_ids: torch.Tensor
    prompt_positions: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_positions: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor
    prompt_targets: torch.Tensor
    prompt_segment: torch.Tensor
    response_pair: torch.Tensor
    response_col: torch.Tensor
    response_targets: torch.Tensor
    response_segment: torch.Tensor
    pairs: int
    responses: int
    slot: int
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    def _k(self, responses: int | None) -> int:
        k = self.responses if responses is None else responses
        if not 1 <= k <= self.responses:
            raise ValueError(f"asked for {k} responses, the batch holds {self.responses}")
        return k

    def prompt_inputs(self, responses: int | None = None) -> dict[str, torch.Tensor]:
        """AVLLM arguments of the prompt pass (add the media, or inputs_embeds, and use_cache=True)."""
        keep = self.prompt_segment < self._k(responses) * self.pairs
        return {"input_ids": self.prompt_ids, "position_ids": self.prompt_positions,
                "attention_mask": self.prompt_mask, "logp_index": self.prompt_index[keep],
                "logp_targets": self.prompt_targets[keep]}

    def visible(self, responses: int | None = None) -> torch.Tensor:
        """(b, 1, k * R, P + k * R) bool, True = attend: the real prompt tokens of the query's pair, and the real
        tokens of its own response up to itself. Every query sees at least its prompt (no empty softmax row)."""
        cols = self._k(responses) * self.slot
        t = torch.arange(cols, device=self.response_ids.device)
        own_past = (t[:, None] // self.slot == t[None, :] // self.slot) & (t[None, :] <= t[:, None])  # (kR, kR)
        responses_seen = own_past[None] & self.response_mask[:, None, :cols].bool()
        prompt_seen = self.prompt_mask[:, None, :].bool().expand(-1, cols, -1)
        return torch.cat([prompt_seen, responses_seen], dim=2).unsqueeze(1)

    def mask_mod(self, responses: int | None = None):
        """``visible`` as a FlexAttention mask_mod over (pair, head, query, key)."""
        prompt_mask, response_mask, slot = self.prompt_mask.bool(), self.response_mask.bool(), self.slot
        prompt_len = prompt_mask.shape[1]

        def mask_mod(b, h, q, kv):
            in_prompt = kv < prompt_len
            r = (kv - prompt_len).clamp(min=0)
            own = (r // slot == q // slot) & (r <= q) & response_mask[b, r]
            return torch.where(in_prompt, prompt_mask[b, kv.clamp(max=prompt_len - 1)], own)

        return mask_mod

    def response_mask_4d(self, implementation: str, dtype: torch.dtype = torch.float32,
                         responses: int | None = None):
        """The response pass's mask in the form ``implementation`` takes: sdpa and eager -> additive float
        (0 / dtype min) in the model's dtype, flex_attention -> BlockMask. Built once per (implementation, dtype,
        responses) and kept: every layer reads the SAME tensor (a bool mask would be turned into a float copy per
        layer by CPU SDPA, each kept for backward)."""
        k = self._k(responses)
        key = (implementation, dtype, k)
        if key not in self._masks:
            self._masks[key] = mask_in_form(implementation, dtype, lambda: self.visible(k), lambda: self.block_mask(k))
        return self._masks[key]

    def block_mask(self, responses: int | None = None):
        """``visible`` as a FlexAttention BlockMask over (kR queries, P + kR keys)."""
        from torch.nn.attention.flex_attention import create_block_mask

        k = self._k(responses)
        return create_block_mask(self.mask_mod(k), B=self.pairs, H=None, Q_LEN=k * self.slot,
                                 KV_LEN=self.prompt_ids.shape[1] + k * self.slot, device=self.response_ids.device)

    def response_inputs(self, prompt_cache, responses: int | None = None, implementation: str = "sdpa",
                        dtype: torch.dtype = torch.float32) -> dict:
        """AVLLM arguments of the response pass over the prompt pass's cache: a ``PrefixCache.reader()``, which
        leaves the prompt's keys / values as they are (an ordinary cache gets the responses appended, so it serves
        one response pass). The prompt's keys / values stay in the autograd graph, so the responses' gradients
        reach the prompt pass."""
        k = self._k(responses)
        cols = k * self.slot
        keep = self.response_segment < k * self.pairs
        return {"input_ids": self.response_ids[:, :cols], "position_ids": self.response_positions[:, :, :cols],
                "attention_mask": self.response_mask_4d(implementation, dtype, k), "cache": prompt_cache,
                "use_cache": True, "logp_index": self.response_pair[keep] * cols + self.response_col[keep],
                "logp_targets": self.response_targets[keep]}

    def response_sums(self, prompt_logps: torch.Tensor, response_logps: torch.Tensor,
                      responses: int | None = None) -> torch.Tensor:
        """(k, b) SUM of the token log-probs of each (response, pair) from the two passes' ``token_logps``
        (computed with ``prompt_inputs(responses)`` / ``response_inputs(..., responses)``)."""
        k = self._k(responses)
        rows = k * self.pairs
        segment = torch.cat([self.prompt_segment[self.prompt_segment < rows],
                             self.response_segment[self.response_segment < rows]])
        logps = torch.cat([prompt_logps, response_logps])
        sums = torch.zeros(rows, dtype=logps.dtype, device=logps.device)
        return sums.index_add(0, segment, logps).view(k, self.pairs)

    def response_counts(self) -> torch.Tensor:
        """(k, b) number of scored tokens of each (response, pair)."""
        segment = torch.cat([self.prompt_segment, self.response_segment])
        return torch.bincount(segment, minlength=self.responses * self.pairs).view(self.responses, self.pairs)


def prefix_batch(batch: dict, responses: int, pad_token_id: int = 0) -> PrefixBatch:
    """A collated preference batch -> PrefixBatch of the first ``responses`` responses (2 or 3) of every pair; the
    same prompt / response split as ``pack_preference`` (``_split_pair``). Padding: ``pad_token_id``, position 1,
    mask 0."""
    if responses > len(batch["responses"]):
        raise ValueError(f"asked for {responses} responses, the batch holds {batch['responses']}")
    b = batch["has_gt"].shape[0]
    pairs = [_split_pair(batch, i, responses) for i in range(b)]
    device = batch["input_ids"].device
    prompt_len = max(len(p["prompt"][0]) for p in pairs)
    slot = max(len(r[0]) for p in pairs for r in p["responses"])

    def padded(length: int):
        return (torch.full((b, length), pad_token_id, dtype=torch.long, device=device),
                torch.ones((3, b, length), dtype=torch.long, device=device),
                torch.zeros((b, length), dtype=torch.long, device=device))

    prompt_ids, prompt_positions, prompt_mask = padded(prompt_len)
    response_ids, response_positions, response_mask = padded(responses * slot)
    first, rest = ([], [], []), ([], [], [], [])  # prompt pass (index, targets, segment); response pass + col
    for i, pair in enumerate(pairs):
        ids, positions = pair["prompt"]
        n = len(ids)
        prompt_ids[i, :n], prompt_positions[:, i, :n], prompt_mask[i, :n] = ids, positions, 1
    for j in range(responses):  # response-major, so both passes' entries come in segment order
        for i, pair in enumerate(pairs):
            (ids, positions, labels), start = pair["responses"][j], j * slot
            n = len(ids)
            columns = slice(start, start + n)
            response_ids[i, columns], response_positions[:, i, columns], response_mask[i, columns] = ids, positions, 1
            scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            head, tail = scored[scored == 0], scored[scored > 0]
            first[0].append(torch.full_like(head, i * prompt_len + len(pair["prompt"][0]) - 1))
            rest[0].append(torch.full_like(tail, i))
            rest[3].append(start + tail - 1)
            for part, cols in ((first, head), (rest, tail)):
                part[1].append(labels[cols])
                part[2].append(torch.full_like(cols, j * b + i))
    (prompt_index, prompt_targets, prompt_segment), (response_pair, response_targets, response_segment,
                                                     response_col) = (tuple(torch.cat(t) for t in part)
                                                                      for part in (first, rest))
    return PrefixBatch(prompt_ids=prompt_ids, prompt_positions=prompt_positions, prompt_mask=prompt_mask,
                       response_ids=response_ids, response_positions=response_positions, response_mask=response_mask,
                       prompt_index=prompt_index, prompt_targets=prompt_targets, prompt_segment=prompt_segment,
                       response_pair=response_pair, response_col=response_col, response_targets=response_targets,
                       response_segment=response_segment, pairs=b, responses=responses, slot=slot)
