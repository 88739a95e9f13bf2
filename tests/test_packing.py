"""Prefix-shared packing (src.models.packing) against the plain stacked path, its oracle: the mask and positions on
a hand-made batch, then on the tiny model (fp32) the same per-token log-probs, per-pair log-probs, gt CE, loss and
gradients for audio+video, video-only, audio-only and mixed prompts, one pair per row or several."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AttentionInterface

from src.lit.dpo import DPOModule, media_inputs, model_call, response_rows
from src.losses.logprobs import IGNORE_INDEX, token_logps
from src.models.lora import LoraSettings
from src.models.packing import PADDING, PROMPT, pack_preference, pack_rows, prefix_batch
from src.models.split_attention import NAME as SPLIT_SDPA
from src.models.split_attention import split_sdpa_attention
from src.models.vision_attention import NAME as VISION_ATTENTION
from tests.test_dpo_module import perturb

ATOL = 1e-5
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
PROMPTS = (None, "Describe the clip.", "What happens? Tell me what you see and what you hear, in order, in a few "
           "sentences.", "Caption.")
REJECTED = ("A green circle moves left. A burst of noise plays.", "Nothing happens.",
            "A blue triangle appears, then a low tone plays twice and the triangle turns red.", "Silence.")


# -- a hand-made batch ----------------------------------------------------------------------------------------

def hand_batch(pairs: list[tuple[list[int], list[list[int]]]]) -> dict:
    """A collated batch (collate_preference's layout) from (prompt ids, [chosen ids, rejected ids]) per pair.
    Positions of a sequence's token t: (t, 100 + t, 200 + t), so the three axes are told apart."""
    b, k = len(pairs), len(pairs[0][1])
    sequences = [(prompt, responses[j]) for j in range(k) for prompt, responses in pairs]
    length = max(len(p) + len(r) for p, r in sequences)
    batch = {"input_ids": torch.zeros(k * b, length, dtype=torch.long),
             "labels": torch.full((k * b, length), IGNORE_INDEX), "attention_mask": torch.zeros(k * b, length),
             "position_ids": torch.ones(3, k * b, length, dtype=torch.long)}
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        batch["input_ids"][row, :n] = torch.tensor(prompt + response)
        batch["labels"][row, len(prompt):n] = torch.tensor(response)
        batch["attention_mask"][row, :n] = 1
        batch["position_ids"][:, row, :n] = torch.arange(n) + torch.tensor([[0], [100], [200]])
    batch.update(responses=["chosen", "rejected"][:k], has_gt=torch.zeros(b, dtype=torch.bool))
    return batch


HAND = [([10, 11, 12], [[20, 21], [30]]), ([13, 14], [[22], [31, 32]])]


def bits(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_hand_made_pairs_mask_positions_and_targets():
    """Budget 6: pair 0 (3 + 2 + 1 tokens) fills row 0; pair 1 (2 + 1 + 2) gets row 1 and one padding token."""
    packed = pack_preference(hand_batch(HAND), responses=2, pack_tokens=6)
    assert packed.rows == [[0], [1]]
    assert packed.input_ids.tolist() == [[10, 11, 12, 20, 21, 30], [13, 14, 22, 31, 32, 0]]
    assert packed.pair.tolist() == [[0] * 6, [1] * 5 + [PADDING]]
    assert packed.part.tolist() == [[PROMPT] * 3 + [1, 1, 2], [PROMPT] * 2 + [1, 2, 2, PADDING]]
    # each response restarts right after its prompt, on all three axes; padding gets position 1
    assert packed.position_ids[0].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 1]]
    assert packed.position_ids[2].tolist() == [[200, 201, 202, 203, 204, 203], [200, 201, 202, 202, 203, 1]]
    expected = torch.stack([
        bits(["100000", "110000", "111000", "111100", "111110", "111001"]),  # prompt causal; chosen; rejected
        bits(["100000", "110000", "111000", "110100", "110110", "000001"]),  # ...; padding sees itself only
    ]).unsqueeze(1)
    assert torch.equal(packed.dense_mask(), expected)
    # token 0 of chosen AND rejected is predicted by the last prompt token (flat 2 in row 0, 6 + 1 in row 1)
    assert packed.logp_index.tolist() == [2, 3, 2, 7, 7, 9]
    assert packed.logp_targets.tolist() == [20, 21, 30, 22, 31, 32]
    assert packed.logp_segment.tolist() == [0, 0, 2, 1, 3, 3]  # response * b + pair
    sums = packed.response_sums(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]))
    assert sums.tolist() == [[3.0, 8.0], [4.0, 48.0]]  # (chosen, rejected) x pairs
    assert packed.response_counts().tolist() == [[2, 1], [1, 2]]
    # the additive form for eager attention: 0 where the bool mask attends, the dtype's minimum elsewhere
    additive = packed.attention_mask("eager", torch.float32)
    assert torch.equal(additive == 0, expected) and additive.min() == torch.finfo(torch.float32).min


def test_several_pairs_in_one_row_do_not_see_each_other():
    packed = pack_preference(hand_batch(HAND), responses=2, pack_tokens=None)
    assert packed.rows == [[0], [1]]
    packed = pack_preference(hand_batch(HAND), responses=2, pack_tokens=11)
    assert packed.rows == [[0, 1]] and packed.input_ids.shape == (1, 11)
    mask = packed.dense_mask()[0, 0]
    assert not mask[6:, :6].any() and not mask[:6, 6:].any()  # no attention across pairs
    assert torch.equal(mask[6:, 6:], pack_preference(hand_batch(HAND), 2, 6).dense_mask()[1, 0, :5, :5])
    assert packed.logp_index.tolist() == [2, 3, 2, 7, 7, 9]  # the same flat indices: row length 11 = 6 + 5


def test_rows_fill_in_pair_order_and_a_long_pair_gets_its_own_row():
    assert pack_rows([3, 3, 5, 2, 9], 6) == [[0, 1], [2], [3], [4]]  # next-fit: pair order is media order
    assert pack_rows([3, 3, 5], None) == [[0], [1], [2]]
    packed = pack_preference(hand_batch(HAND), responses=2, pack_tokens=4)  # both pairs longer than the budget
    assert packed.rows == [[0], [1]] and packed.input_ids.shape == (2, 6)
    with pytest.raises(ValueError, match="pack_tokens"):
        pack_preference(hand_batch(HAND), responses=2, pack_tokens=0)


def test_a_pair_whose_responses_have_different_prompts_is_refused():
    batch = hand_batch([([10, 11, 12], [[20], [30]])])
    batch["input_ids"][1, 1] = 99
    with pytest.raises(ValueError, match="different prompt"):
        pack_preference(batch, responses=2)
    batch = hand_batch([([10, 11, 12], [[20], [30]])])
    batch["position_ids"][1, 1, 0] = 7
    with pytest.raises(ValueError, match="different prompt"):
        pack_preference(batch, responses=2)
    batch = hand_batch([([10, 11, 12], [[20], [30]])])
    batch["labels"][1] = IGNORE_INDEX  # a prompt-only row, as collate_preference writes for a missing gt
    with pytest.raises(ValueError, match="no labelled tokens"):
        pack_preference(batch, responses=2)


def test_flex_mask_mod_is_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    packed = pack_preference(hand_batch(HAND), responses=2, pack_tokens=11)
    r, length = packed.input_ids.shape
    assert torch.equal(create_mask(packed.mask_mod(), r, None, length, length, device="cpu"), packed.dense_mask())


@pytest.mark.parametrize("responses", [1, 2])
def test_flex_mask_mod_is_the_dense_mask_in_the_cache_form(responses):
    from torch.nn.attention.flex_attention import create_mask

    prefix = prefix_batch(hand_batch(HAND), responses=2, pad_token_id=0)
    queries = responses * prefix.slot
    keys = prefix.prompt_ids.shape[1] + queries
    flex = create_mask(prefix.mask_mod(responses), prefix.pairs, None, queries, keys, device="cpu")
    assert torch.equal(flex, prefix.visible(responses))


# -- the tiny model ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tiny_base, synthav):
    """The first 4 SynthAV training clips, decoded once, with their captions."""
    from src.models.processor import AVProcessor

    processor = AVProcessor.from_pretrained(tiny_base)
    rows = [json.loads(line) for line in (synthav / "train.jsonl").read_text().splitlines()[:4]]
    return [(processor.load_clip(str(synthav / row["video"])), row["caption"]) for row in rows]


def variant(clip, modality: str, keep: float):
    """The clip cut to its first ``keep`` fraction (so prompts differ in length), as audio+video, video or audio."""
    frames = max(2, int(keep * clip.frames.shape[0]) // 2 * 2)
    audio = clip.audio[:int(keep * clip.audio.numel())]
    cut = replace(clip, frames=clip.frames[:frames], frame_times=clip.frame_times[:frames], audio=audio)
    if modality == "video":
        return replace(cut, audio=None, audio_status="disabled")
    if modality == "audio":
        return replace(cut, frames=None, frame_times=None)
    return cut


MODALITIES = {"audio+video": ["audio+video"] * 4, "video": ["video"] * 4, "audio": ["audio"] * 4,
              "mixed": ["video", "audio", "audio+video", "audio"]}


def preference_batch(processor, clips, modality: str, gt: bool = True) -> dict:
    """4 pairs with different prompts, media lengths and response lengths."""
    samples = []
    for i, (clip, caption) in enumerate(clips):
        responses = {"chosen": caption.split(". ")[0] + ".", "rejected": REJECTED[i], "gt": caption if gt else None}
        sample = processor.encode_preference(variant(clip, MODALITIES[modality][i], 1.0 - 0.2 * i), PROMPTS[i],
                                             responses)
        sample["ref_chosen_logp"] = sample["ref_rejected_logp"] = None
        samples.append(sample)
    return processor.collate(samples)


def module_for(base, trainable=("lora", "aligner", "merger"), **kwargs) -> DPOModule:
    """A DPOModule after pretend training (random LoRA B, aligner/merger moved), in eval mode, so the policy
    differs from the reference and every trainable parameter gets a gradient."""
    module = DPOModule(base=str(base), trainable=list(trainable), lora=LoraSettings(**LORA), **kwargs)
    module.configure_model()
    perturb(module)
    module.model.eval()
    return module


def budget(batch: dict, responses: int, pairs_per_row: int | None) -> int | None:
    """A pack_tokens that holds about ``pairs_per_row`` pairs (None: one pair per row)."""
    if pairs_per_row is None:
        return None
    lengths = pack_preference(batch, responses).pair.ne(PADDING).sum(1)
    return int(lengths.sort(descending=True).values[:pairs_per_row].sum())


def plain_token_logps(model, batch: dict, responses: int) -> list[torch.Tensor]:
    """Per (response, pair), in response-major order: the labelled tokens' log-probs of the stacked pass."""
    b = batch["has_gt"].shape[0]
    sequences = response_rows(batch, responses * b)
    logits = model(**model_call(sequences, responses * b), **media_inputs(batch), media_repeats=responses).logits
    logps, mask = token_logps(logits, sequences["labels"])
    return [logps[row][mask[row]] for row in range(responses * b)]


def packed_token_logps(model, packed, batch: dict) -> list[torch.Tensor]:
    out = model(**packed.model_inputs("sdpa"), **media_inputs(batch), **packed.logp_inputs(), return_logits=False)
    return [out.token_logps[packed.logp_segment == s] for s in range(packed.responses * packed.pairs)]


@pytest.mark.parametrize("pairs_per_row", [None, 2, 4], ids=["one-pair-per-row", "about-2-per-row", "one-row"])
@pytest.mark.parametrize("modality", list(MODALITIES))
def test_packed_token_logps_equal_the_stacked_sequences(tiny_base, clips, modality, pairs_per_row):
    module = module_for(tiny_base)
    batch = preference_batch(module.processor, clips, modality)
    packed = pack_preference(batch, 3, budget(batch, 3, pairs_per_row), module.processor.pad_token_id)
    if pairs_per_row:
        assert max(len(row) for row in packed.rows) >= 2
    assert len(set(packed.response_counts()[0].tolist())) > 1  # responses of different lengths
    with torch.no_grad():
        plain = plain_token_logps(module.model, batch, 3)
        fast = packed_token_logps(module.model, packed, batch)
    assert [len(t) for t in fast] == [len(t) for t in plain]
    diff = max((a - b).abs().max().item() for a, b in zip(plain, fast))
    print(f"\n{modality} {pairs_per_row}: max |token logp diff| {diff:.2e}")
    assert diff <= ATOL


def test_packed_positions_are_each_responses_own(tiny_base, clips):
    """Every packed token carries the 3-D position it has in its own unpacked sequence."""
    module = module_for(tiny_base)
    batch = preference_batch(module.processor, clips, "mixed")
    packed = pack_preference(batch, 3, budget(batch, 3, 2))
    b = 4
    for r, row in enumerate(packed.rows):
        for i in row:
            for j in range(3):
                keep = (packed.pair[r] == i) & ((packed.part[r] == PROMPT) | (packed.part[r] == j + 1))
                unpacked = batch["position_ids"][:, j * b + i][:, batch["attention_mask"][j * b + i].bool()]
                assert torch.equal(packed.position_ids[:, r][:, keep], unpacked)
                assert torch.equal(packed.input_ids[r][keep], batch["input_ids"][j * b + i][:unpacked.shape[1]])


def grads(module: DPOModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def assert_step_equals_plain(plain: tuple, fast: tuple, gt: bool, label: str) -> dict[str, torch.Tensor]:
    """(out, loss, grads) of the plain step and a prefix-shared one: per-pair values, gt CE, loss and every
    gradient agree (summed log-probs are ~ -80: compared at fp32 resolution of that size, the rest at ATOL).
    Returns the plain step's gradients."""
    (plain_out, plain_loss, plain_grads), (fast_out, fast_loss, fast_grads) = plain, fast
    diffs = {k: (plain_out[k] - fast_out[k]).abs().max().item() for k in plain_out}
    diffs["loss"] = (plain_loss - fast_loss).abs().item()
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 0
    diffs["grad"] = max((plain_grads[n] - fast_grads[n]).abs().max().item() for n in plain_grads)
    scale = max(g.abs().max().item() for g in plain_grads.values())
    print(f"\n{label}: max grad {scale:.2e}, diffs " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for key in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        assert torch.allclose(fast_out[key], plain_out[key], rtol=1e-6, atol=ATOL), key
    assert diffs["gt_ce"] <= ATOL and diffs["loss"] <= ATOL
    assert (fast_out["gt_ce"] > 0).all() if gt else not fast_out["gt_ce"].any()
    for name in plain_grads:
        assert torch.allclose(fast_grads[name], plain_grads[name], rtol=1e-4, atol=ATOL), name
    return plain_grads


@pytest.mark.parametrize("trainable, gt_weight, pairs_per_row", [
    (("lora",), 0.1, None),  # reference pass hands its embeddings over (same packed rows, gt included)
    (("lora", "aligner", "merger"), 0.1, 2),  # reference packs [prompt | chosen | rejected] on its own
    (("lora", "aligner", "merger"), 0.0, 4),  # plain DPO: no gt in the rows
    (("lora",), 0.0, 2),
])
def test_packed_step_equals_plain_step_values_loss_and_gradients(tiny_base, clips, trainable, gt_weight,
                                                                 pairs_per_row):
    module = module_for(tiny_base, trainable, gt_weight=gt_weight, prefix_sharing="mask")
    batch = preference_batch(module.processor, clips, "audio+video", gt=gt_weight > 0)
    module.pack_tokens = budget(batch, 3 if gt_weight else 2, pairs_per_row)
    results = {}
    for packed in (False, True):
        module.packed = packed
        module.model.zero_grad(set_to_none=True)
        out = module.preference_forward(batch)
        loss, stats = module.loss_and_stats(out)
        loss.backward()
        results[packed] = out, loss.detach(), grads(module)
    plain_grads = assert_step_equals_plain(results[False], results[True], gt_weight > 0,
                                           f"{trainable} gt_weight={gt_weight} {pairs_per_row}")
    assert any("aligner" in n for n in plain_grads) == ("aligner" in trainable)


@pytest.mark.slow
def test_flex_attention_equals_sdpa_on_cpu(tiny_base, clips):
    """The BlockMask path through transformers' flex_attention (torch.compile on CPU: ~40 s the first time)."""
    module = module_for(tiny_base)
    batch = preference_batch(module.processor, clips, "mixed")
    packed = pack_preference(batch, 3, budget(batch, 3, 2))
    with torch.no_grad():
        sdpa = packed_token_logps(module.model, packed, batch)
        module.model.llm.config._attn_implementation = "flex_attention"
        try:
            out = module.model(**packed.model_inputs("flex_attention"), **media_inputs(batch),
                               **packed.logp_inputs(), return_logits=False)
        finally:
            module.model.llm.config._attn_implementation = "sdpa"
    flex = out.token_logps
    diff = (torch.cat(sdpa) - torch.cat([flex[packed.logp_segment == s] for s in range(12)])).abs().max().item()
    print(f"\nflex vs sdpa: max |token logp diff| {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.slow
def test_flex_attention_cache_form_equals_sdpa_on_cpu(tiny_base, clips):
    """DPOModule's default cache form under llm_attention='flex_attention' (the response pass's BlockMask on the
    prompt cache) gives the sdpa values. Compiled afresh: after another test's shapes, inductor recompiles the CPU
    flex kernel with dynamic shapes, and that C++ fails to build in torch 2.11 ('cur_qSplitSize8' not declared)."""
    torch._dynamo.reset()
    batch = preference_batch(module_for(tiny_base).processor, clips, "mixed")
    values = {}
    for kernel in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        module = module_for(tiny_base, llm_attention=kernel, prefix_sharing="cache")
        with torch.no_grad():
            values[kernel] = module.preference_forward(batch)
    for key, value in values["sdpa"].items():
        assert torch.allclose(values["flex_attention"][key], value, rtol=1e-6, atol=ATOL), key


@pytest.mark.parametrize("prefix_sharing", ["mask", "cache"])
def test_llm_attention_setting_switches_the_decoder_kernel_only(tiny_base, clips, prefix_sharing):
    """llm_attention='eager' takes the packed rows' additive mask (or the cache form's 2-D masks) and gives the
    sdpa values; the encoders keep their own kernel; an unknown kernel is refused."""
    batch = preference_batch(module_for(tiny_base).processor, clips, "mixed")
    values = {}
    for kernel in ("sdpa", "eager"):
        torch.manual_seed(0)  # the same fresh LoRA A in both modules
        module = module_for(tiny_base, llm_attention=kernel, prefix_sharing=prefix_sharing)
        assert module.model.llm.config._attn_implementation == kernel
        assert module.model.visual.config._attn_implementation == VISION_ATTENTION  # the tower keeps its own
        with torch.no_grad():
            values[kernel] = module.preference_forward(batch)
    for key, value in values["sdpa"].items():
        assert torch.allclose(values["eager"][key], value, rtol=1e-6, atol=ATOL), key
    with pytest.raises(ValueError, match="llm_attention"):
        DPOModule(base=str(tiny_base), llm_attention="flash")


def test_compile_decoder_compiles_every_llm_layer_and_nothing_else(tiny_base):
    """compile_decoder=True wraps each decoder layer's call in torch.compile (lazy: nothing compiles until a
    forward); the encoders and the aligner stay eager; off by default."""
    module = DPOModule(base=str(tiny_base), lora=LoraSettings(**LORA), prefix_sharing="mask", compile_decoder=True)
    module.configure_model()
    layers = list(module.model.llm.layers)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    compiled = [m for m in module.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == len(layers) and all(any(m is layer for layer in layers) for m in compiled)
    with pytest.raises(ValueError, match="compile_decoder needs prefix_sharing 'split' or 'mask'"):
        DPOModule(base=str(tiny_base), prefix_sharing="cache", compile_decoder=True)
    plain = DPOModule(base=str(tiny_base), lora=LoraSettings(**LORA))
    plain.configure_model()
    assert all(layer._compiled_call_impl is None for layer in plain.model.llm.layers)


@pytest.mark.slow
@pytest.mark.parametrize("prefix_sharing", ["mask", "split"])
def test_compile_decoder_gives_the_eager_loss_and_gradients_with_one_graph_for_all_layers(tiny_base, clips,
                                                                                        prefix_sharing):
    """The mask and split forms (no KV cache, so no layer index reaches the graph) with compiled decoder layers,
    activation checkpointing on: the eager step's loss and gradients (fp32), and dynamo builds ONE graph that
    serves both decoder layers (the rows carry reference log-probs, as the rollout's do, so no no-grad pass adds a
    graph of its own), and still one after a batch of other lengths and another shared prompt prefix. (CPU
    inductor: ~30 s each.)"""
    from torch._dynamo.utils import counters

    def with_reference(order):
        batch = preference_batch(module_for(tiny_base).processor, order, "mixed")
        with torch.no_grad():
            out = module_for(tiny_base).preference_forward(batch)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = out["ref_chosen"], out["ref_rejected"]
        return batch

    batch = with_reference(clips)
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = module_for(tiny_base, prefix_sharing=prefix_sharing, compile_decoder=compiled,
                            activation_checkpointing=True)
        module.model.train()
        loss, _ = module.loss_and_stats(module.preference_forward(batch))
        loss.backward()
        results[compiled] = loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    (eager_loss, eager_grads), (loss, grads) = results[False], results[True]
    assert torch.allclose(loss, eager_loss, atol=ATOL)
    assert grads.keys() == eager_grads.keys() and any("lora" in n for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-4, atol=1e-6), name
    assert len(module.model.llm.layers) == 2 and counters["stats"]["unique_graphs"] == 1
    other = with_reference(clips[:2])
    rows = [pack_preference(b, 3, None, module.processor.pad_token_id) for b in (batch, other)]
    assert rows[0].input_ids.shape != rows[1].input_ids.shape and rows[0].shared_prefix() != rows[1].shared_prefix()
    module.loss_and_stats(module.preference_forward(other))[0].backward()
    assert counters["stats"]["unique_graphs"] == 1

# -- KV-cache prefix sharing (prefix_sharing="cache") -------------------------------------------------------------

def test_prefix_batch_hand_made_inputs_and_targets():
    """Pair 0: prompt 3, chosen 2, rejected 1; pair 1: prompt 2, chosen 1, rejected 2. Token 0 of every response
    comes from the prompt pass (last real prompt token: flat 2, and 3 + 1 = 4); the rest from the response pass,
    whose one row per pair holds chosen in columns 0-1 and rejected in 2-3 (slots of the longest response, 2)."""
    prefix = prefix_batch(hand_batch(HAND), responses=2, pad_token_id=0)
    assert prefix.prompt_ids.tolist() == [[10, 11, 12], [13, 14, 0]]
    assert prefix.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert prefix.prompt_positions[1].tolist() == [[100, 101, 102], [100, 101, 1]]
    assert prefix.slot == 2
    assert prefix.response_ids.tolist() == [[20, 21, 30, 0], [22, 0, 31, 32]]  # [chosen | rejected] per pair
    assert prefix.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 1, 1]]
    assert prefix.response_positions[2].tolist() == [[203, 204, 203, 1], [202, 1, 202, 203]]
    assert prefix.prompt_index.tolist() == [2, 4, 2, 4] and prefix.prompt_targets.tolist() == [20, 22, 30, 31]
    assert prefix.prompt_segment.tolist() == [0, 1, 2, 3]
    assert prefix.response_pair.tolist() == [0, 1] and prefix.response_col.tolist() == [0, 2]
    assert prefix.response_targets.tolist() == [21, 32] and prefix.response_segment.tolist() == [0, 3]
    expected = torch.stack([
        bits(["111" "1000", "111" "1100", "111" "0010", "111" "0010"]),  # prompt | chosen | rejected (pad unseen)
        bits(["110" "1000", "110" "1000", "110" "0010", "110" "0011"]),  # the padded prompt slot is never seen
    ]).unsqueeze(1)
    assert torch.equal(prefix.visible(), expected)
    assert torch.equal(prefix.visible(responses=1), expected[..., :5][:, :, :2])
    additive = prefix.response_mask_4d("sdpa", torch.float32)
    assert torch.equal(additive == 0, expected) and additive is prefix.response_mask_4d("sdpa", torch.float32)
    with pytest.raises(ValueError, match="4-D mask"):
        prefix.response_mask_4d("flash_attention_2")
    sums = prefix.response_sums(torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([16.0, 32.0]))
    assert sums.tolist() == [[17.0, 2.0], [4.0, 40.0]]
    assert prefix.response_counts().tolist() == [[2, 1], [1, 2]]
    inputs = prefix.prompt_inputs(responses=1)
    assert inputs["logp_index"].tolist() == [2, 4] and inputs["logp_targets"].tolist() == [20, 22]


def test_prefix_batch_response_inputs_index_the_rows_they_pass():
    """The response pass's flat indices follow its row length: 2 * slot columns for chosen + rejected, slot for
    chosen alone; the prompt pass's cache is handed on as it is (no copy of the prompt's keys)."""
    prefix = prefix_batch(hand_batch(HAND), responses=2, pad_token_id=0)
    cache = object()
    inputs = prefix.response_inputs(cache)
    assert inputs["logp_index"].tolist() == [0, 6] and inputs["input_ids"].shape == (2, 4)
    assert inputs["cache"] is cache and inputs["use_cache"]
    one = prefix.response_inputs(cache, responses=1)
    assert one["input_ids"].tolist() == [[20, 21], [22, 0]] and one["logp_index"].tolist() == [0]
    assert one["attention_mask"].shape == (2, 1, 2, 5)


def cache_step(module: DPOModule, batch: dict, mode: str):
    """preference_forward + loss + backward in ``mode`` (plain, cache or mask)."""
    module.packed = mode != "plain"
    module.prefix_sharing = "cache" if mode == "plain" else mode
    module.model.zero_grad(set_to_none=True)
    out = module.preference_forward(batch)
    loss, _ = module.loss_and_stats(out)
    loss.backward()
    return out, loss.detach(), grads(module)


@pytest.mark.parametrize("trainable, gt, modality", [
    (("lora",), True, "audio+video"),  # the reference's prompt pass hands its embeddings to the policy
    (("lora", "aligner", "merger"), True, "audio+video"),  # the reference runs the encoders itself
    (("lora", "aligner", "merger"), True, "video"),
    (("lora", "aligner", "merger"), False, "audio"),
    (("lora",), False, "mixed"),
    (("lora", "aligner", "merger"), True, "mixed"),
])
def test_cache_step_equals_plain_step_values_loss_and_gradients(tiny_base, clips, trainable, gt, modality):
    module = module_for(tiny_base, trainable, gt_weight=0.1 if gt else 0.0, prefix_sharing="cache")
    batch = preference_batch(module.processor, clips, modality, gt=gt)
    plain_grads = assert_step_equals_plain(cache_step(module, batch, "plain"), cache_step(module, batch, "cache"),
                                           gt, f"cache {trainable} gt={gt} {modality}")
    if modality != "video":  # no audio, no aligner gradient
        assert any("aligner" in n for n in plain_grads) == ("aligner" in trainable)


@pytest.mark.parametrize("mode", ["cache", "mask", "split"])
def test_prefix_sharing_under_activation_checkpointing_equals_the_plain_step(tiny_base, clips, mode):
    """The 7B recipes train with activation checkpointing. transformers drops a KV cache from a checkpointed layer
    (a cache that appends would be written again when backward recomputes the layer), which left the cache path's
    responses without their prompt (a shape error on the GPU). With checkpointing on and the layers really
    recomputed in backward, both prefix-sharing modes give the plain step's values, loss and gradients."""
    module = module_for(tiny_base, gt_weight=0.1, activation_checkpointing=True, prefix_sharing=mode)
    module.model.train()  # layers are checkpointed in training mode only (dropout is 0 in this model and LoRA)
    batch = preference_batch(module.processor, clips, "mixed")
    calls = []
    hook = module.model.llm.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        plain = cache_step(module, batch, "plain")
        calls.clear()
        fast = cache_step(module, batch, mode)
    finally:
        hook.remove()
    # reference pass (no grad) + policy passes (grad), then the policy passes again in backward's recompute
    policy_passes = 2 if mode == "cache" else 1
    assert calls.count(True) == 2 * policy_passes, calls
    assert_step_equals_plain(plain, fast, True, f"{mode} under activation checkpointing")


@pytest.mark.parametrize("trainable, gt, modality, pairs_per_row", [
    (("lora",), True, "audio+video", None),  # the reference pass hands its embeddings to the policy
    (("lora", "aligner", "merger"), True, "mixed", None),  # prompts of different lengths: padding, a longer tail
    (("lora", "aligner", "merger"), False, "video", 2),  # a second pair in a row: under the mask part
])
def test_split_step_equals_plain_step_values_loss_and_gradients(tiny_base, clips, monkeypatch, trainable, gt,
                                                                modality, pairs_per_row):
    """prefix_sharing='split' (src.models.split_attention: the rows' shared prompt prefix causal, the rest under a
    mask) gives the plain step's values, loss and gradients; every decoder layer of the packed passes really runs
    the two calls, and the plain path on the same model (its implementation set to the split one) runs SDPA."""
    module = module_for(tiny_base, trainable, gt_weight=0.1 if gt else 0.0, prefix_sharing="split")
    assert module.model.llm.config._attn_implementation == SPLIT_SDPA
    batch = preference_batch(module.processor, clips, modality, gt=gt)
    module.pack_tokens = budget(batch, 3 if gt else 2, pairs_per_row)
    calls = []

    def counted(attention, query, key, value, mask, **kwargs):
        calls.append(type(mask).__name__)
        return split_sdpa_attention(attention, query, key, value, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, SPLIT_SDPA, counted)
    plain = cache_step(module, batch, "plain")
    plain_calls, calls[:] = list(calls), []
    split = cache_step(module, batch, "split")
    layers = len(module.model.llm.layers)
    assert "SplitMask" not in plain_calls and len(plain_calls) == 2 * layers  # reference + policy
    assert calls == ["SplitMask"] * 2 * layers, calls
    assert_step_equals_plain(plain, split, gt, f"split {trainable} gt={gt} {modality} {pairs_per_row}")


def test_split_form_needs_sdpa(tiny_base):
    with pytest.raises(ValueError, match="runs SDPA"):
        DPOModule(base=str(tiny_base), prefix_sharing="split", llm_attention="flex_attention")
    with pytest.raises(ValueError, match="prefix_sharing must be"):
        DPOModule(base=str(tiny_base), prefix_sharing="kv")


def test_cache_token_logps_equal_the_stacked_sequences(tiny_base, clips):
    """Per token, both passes together: the plain path's log-prob of every labelled token."""
    module = module_for(tiny_base)
    batch = preference_batch(module.processor, clips, "mixed")
    prefix = prefix_batch(batch, 3, module.processor.pad_token_id)
    with torch.no_grad():
        plain = plain_token_logps(module.model, batch, 3)
        prompt = module.model(**prefix.prompt_inputs(), **media_inputs(batch), use_cache=True, return_logits=False)
        reply = module.model(**prefix.response_inputs(prompt.cache), return_logits=False)
    fast = [torch.cat([prompt.token_logps[prefix.prompt_segment == s], reply.token_logps[prefix.response_segment == s]])
            for s in range(12)]
    assert [len(t) for t in fast] == [len(t) for t in plain]
    diff = max((a - b).abs().max().item() for a, b in zip(plain, fast))
    print(f"\ncache: max |token logp diff| {diff:.2e}")
    assert diff <= ATOL


def test_mask_mode_sdpa_mask_is_one_float_tensor_shared_by_every_layer(tiny_base, clips):
    """prefix_sharing='mask' under sdpa: the mask is additive float in the model's dtype, built once per rows, and
    the backward graph keeps ONE (L x L)-sized copy of it, not one per layer."""
    module = module_for(tiny_base, prefix_sharing="mask")
    batch = preference_batch(module.processor, clips, "mixed")
    packed = pack_preference(batch, 3, None, module.processor.pad_token_id)
    mask = packed.attention_mask("sdpa", module.model.dtype)
    assert mask.dtype == module.model.dtype and mask is packed.attention_mask("sdpa", module.model.dtype)
    assert torch.equal(mask == 0, packed.dense_mask())
    r, length = packed.input_ids.shape
    saved = set()

    def pack_hook(t):
        if t.numel() >= r * length * length and t.shape[-2:] == (length, length):
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        module.packed_call(packed, media_inputs(batch))
    layers = len(module.model.llm.layers)
    print(f"\n{layers} layers: {len(saved)} saved (L x L) tensors")
    assert layers > 1 and len(saved) <= 1
