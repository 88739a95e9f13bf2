"""The frozen vision path's token cache (src/models/video_cache.py) and SFTModule's use of it."""

from __future__ import annotations

import pytest
import torch

from src.data.manifest import read_manifest
from src.lit.sft import SFTModule
from src.models.build import load_base
from src.models.video_cache import FrozenVideoCache, video_keys


@pytest.fixture(scope="module")
def batch_and_model(tiny_base, synthav):
    model, proc = load_base(tiny_base)
    model.eval().requires_grad_(False)
    rows = read_manifest(synthav / "train.jsonl")[:3]
    return model, proc, proc.collate([proc(r) for r in rows])


def test_cached_tokens_equal_the_towers_and_are_reused(batch_and_model):
    model, _, batch = batch_and_model
    cache = FrozenVideoCache()
    keys = video_keys(batch, model.config.qwen_config.video_token_id)
    assert keys == batch["id"]
    with torch.no_grad():
        want = model.video_embeddings(batch["pixel_values_videos"], batch["video_grid_thw"])
    first = cache.tokens(model, batch["pixel_values_videos"], batch["video_grid_thw"], keys)
    torch.testing.assert_close(first, want, atol=1e-6, rtol=0)
    assert (cache.hits, cache.misses) == (0, 3)
    again = cache.tokens(model, batch["pixel_values_videos"], batch["video_grid_thw"], keys)
    assert torch.equal(again, first) and (cache.hits, cache.misses) == (3, 3)


def test_changed_pixels_under_the_same_id_are_a_miss(batch_and_model):
    model, _, batch = batch_and_model
    cache = FrozenVideoCache()
    keys = batch["id"]
    cache.tokens(model, batch["pixel_values_videos"], batch["video_grid_thw"], keys)
    other = batch["pixel_values_videos"].flip(0)  # every clip's pixels change, ids and grids stay
    with torch.no_grad():
        want = model.video_embeddings(other, batch["video_grid_thw"])
    got = cache.tokens(model, other, batch["video_grid_thw"], keys)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert cache.misses == 6


def test_a_trainable_vision_path_is_refused(tiny_base, batch_and_model):
    _, _, batch = batch_and_model
    model, _ = load_base(tiny_base)
    model.requires_grad_(False)
    model.visual.merger.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen vision path"):
        FrozenVideoCache().tokens(model, batch["pixel_values_videos"], batch["video_grid_thw"], batch["id"])
    module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "merger"], cache_video_tokens=True)
    with pytest.raises(ValueError, match="frozen vision path"):
        module.configure_model()


def test_sft_steps_with_the_cache_equal_steps_without(tiny_base, batch_and_model):
    """Two optimizer steps on the same batch: the second reads the cache; losses and weights match."""
    _, _, batch = batch_and_model
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"], lr=1e-3,
                           cache_video_tokens=cached)
        module.configure_model()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(2):
            loss = module(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, module.model.lm_head.weight.detach().clone(), module.video_cache))
    (plain, w_plain, _), (cached, w_cached, cache) = results
    assert plain == pytest.approx(cached, abs=1e-6)
    torch.testing.assert_close(w_plain, w_cached, atol=1e-6, rtol=0)
    assert (cache.hits, cache.misses) == (3, 3)
