"""The frozen encoders' output cache (src/models/media_cache.py): the model's side, the processor's side, and
SFTModule's use of both."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from src.data.manifest import read_manifest
from src.lit.sft import SFTModule
from src.models.build import load_base
from src.models.media_cache import FrozenMediaCache, gather_media


@pytest.fixture(scope="module")
def rows(synthav):
    return read_manifest(synthav / "train.jsonl")[:3]


@pytest.fixture()
def frozen(tiny_base):
    model, proc = load_base(tiny_base)
    model.eval().requires_grad_(False)
    return model, proc


def embed(model, batch):
    keys = ("pixel_values_videos", "video_grid_thw", "input_features", "audio_chunks", "audio_windows", "video_keys",
            "video_tokens", "audio_keys", "audio_states")
    with torch.no_grad():
        return model.embed(batch["input_ids"], **{k: batch[k] for k in keys if k in batch})


def test_repeated_keys_are_encoded_once_per_call_with_or_without_a_store():
    """gather_media computes each key once per call (the rollout's K samples of a video); unkeyed items each get
    their own encode; given features are never recomputed; duplicates count as hits in the store's tally."""
    calls = []

    def encode(todo):
        calls.append(list(todo))
        return [torch.full((2,), float(i)) for i in todo]

    keys = ["a", "b", "a", None, "b", None]
    for store in (None, {}):
        calls.clear()
        out, computed = gather_media(store, keys, None, len(keys), encode)
        assert calls == [[0, 1, 3, 5]] and computed == 4
        assert [int(t[0]) for t in out] == [0, 1, 0, 3, 1, 5]
    given = [None, torch.zeros(2), None, None, None, None]
    calls.clear()
    out, computed = gather_media(None, keys, given, len(keys), encode)
    assert calls == [[0, 3, 4, 5]] and out[1] is given[1] and int(out[4][0]) == 4 and computed == 4
    cache = FrozenMediaCache(["video"])
    cache.gather("video", keys, None, len(keys), encode)
    assert cache.misses["video"] == 4 and cache.hits["video"] == 2 and set(cache.stores["video"]) == {"a", "b"}


def test_the_model_stores_keyed_outputs_and_reads_them_back(frozen, rows):
    model, proc = frozen
    plain = proc.collate([proc(r) for r in rows])
    assert "video_keys" not in plain and "audio_keys" not in plain  # no keys without a cache
    want = embed(model, plain)

    cache = FrozenMediaCache()
    model.media_cache = cache
    proc.media_keys = True  # keys only: the processor itself does not serve from the cache here
    batch = proc.collate([proc(r) for r in rows])
    assert len(set(batch["video_keys"])) == 3 and batch["video_keys"] == batch["audio_keys"]
    assert all(k.startswith(r.id + ":") for k, r in zip(batch["video_keys"], rows))
    torch.testing.assert_close(embed(model, batch), want, atol=1e-6, rtol=0)
    assert cache.misses == {"video": 3, "audio": 3} and cache.hits == {"video": 0, "audio": 0}
    again = embed(model, batch)
    assert torch.equal(again, embed(model, batch))
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
    assert cache.misses == {"video": 3, "audio": 3} and cache.hits == {"video": 6, "audio": 6}


def test_the_processor_skips_clips_the_cache_holds(frozen, rows, monkeypatch):
    model, proc = frozen
    want = embed(model, proc.collate([proc(r) for r in rows]))
    cache = FrozenMediaCache()
    model.media_cache = cache
    proc.use_media_cache(cache)
    first = proc.collate([proc(r) for r in rows])
    assert "pixel_values_videos" in first and "video_tokens" not in first
    embed(model, first)  # stores every part of the three clips

    loads = []
    monkeypatch.setattr(proc, "load_clip", lambda *a, **k: loads.append(a) or pytest.fail("clip loaded"))
    samples = [proc(r) for r in rows]
    assert loads == [] and all(s["pixel_values_videos"] is None and s["input_features"] is None for s in samples)
    second = proc.collate(samples)
    assert "pixel_values_videos" not in second and "input_features" not in second
    assert len(second["video_tokens"]) == 3 and len(second["audio_states"]) == 3
    for key in ("input_ids", "labels", "position_ids", "attention_mask", "video_grid_thw"):
        assert torch.equal(second[key], first[key]), key
    assert second["audio_chunks"] == first["audio_chunks"] and second["audio_windows"] == first["audio_windows"]
    torch.testing.assert_close(embed(model, second), want, atol=1e-6, rtol=0)


def test_a_batch_mixing_stored_and_new_clips(frozen, synthav):
    model, proc = frozen
    rows = read_manifest(synthav / "train.jsonl")[:4]
    want = embed(model, proc.collate([proc(r) for r in rows]))
    cache = FrozenMediaCache()
    model.media_cache = cache
    proc.use_media_cache(cache)
    embed(model, proc.collate([proc(r) for r in rows[1:3]]))  # clips 1 and 2 stored
    mixed = proc.collate([proc(r) for r in rows])
    assert [t is not None for t in mixed["video_tokens"]] == [False, True, True, False]
    assert [t is not None for t in mixed["audio_states"]] == [False, True, True, False]
    assert mixed["pixel_values_videos"].shape[0] == 2 * mixed["video_grid_thw"][0].prod()
    torch.testing.assert_close(embed(model, mixed), want, atol=1e-6, rtol=0)
    assert cache.misses == {"video": 4, "audio": 4} and cache.hits == {"video": 2, "audio": 2}


def test_a_rewritten_file_is_a_new_key(frozen, rows, tmp_path):
    model, proc = frozen
    row = rows[0]
    video = tmp_path / "clip.mp4"
    video.write_bytes(open(row.video, "rb").read())
    row = dataclasses.replace(row, video=str(video))
    cache = FrozenMediaCache()
    model.media_cache = cache
    proc.use_media_cache(cache)
    embed(model, proc.collate([proc(row)]))
    assert proc(row)["pixel_values_videos"] is None  # stored: served from the cache
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "rewritten in place"
    sample = proc(row)
    assert sample["pixel_values_videos"] is not None and sample["media_key"] not in cache.stores["video"]


def test_a_trainable_encoder_is_refused(tiny_base, rows):
    model, proc = load_base(tiny_base)
    model.requires_grad_(False)
    model.whisper.layers[0].requires_grad_(True)
    model.media_cache = FrozenMediaCache(["audio"])
    proc.media_keys = True
    batch = proc.collate([proc(r) for r in rows])
    with pytest.raises(ValueError, match="frozen Whisper encoder"):
        model.embed(batch["input_ids"], None, None, batch["input_features"], batch["audio_chunks"],
                    batch["audio_windows"], audio_keys=batch["audio_keys"])
    module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "vision"], cache_video_tokens=True)
    with pytest.raises(ValueError, match="frozen vision tower"):
        module.configure_model()
    module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "whisper"], cache_audio_states=True)
    with pytest.raises(ValueError, match="frozen Whisper encoder"):
        module.configure_model()


def test_sft_steps_with_the_cache_equal_steps_without(tiny_base, rows):
    """Two optimizer steps on the same three rows, each batch built by the processor: with the cache the second
    batch comes from it (no pixels, no log-mel, no encoder forward); losses and weights match."""
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "aligner"], lr=1e-3,
                           cache_video_tokens=cached, cache_audio_states=cached)
        module.configure_model()
        if cached:
            module.processor.use_media_cache(module.media_cache)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        losses, batches = [], []
        for _ in range(2):
            batch = module.processor.collate([module.processor(r) for r in rows])
            loss = module(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            batches.append(batch)
        results.append((losses, module.model.lm_head.weight.detach().clone(), module.media_cache, batches))
    (plain, w_plain, _, _), (cached, w_cached, cache, batches) = results
    assert plain == pytest.approx(cached, abs=1e-6)
    torch.testing.assert_close(w_plain, w_cached, atol=1e-6, rtol=0)
    assert cache.misses == {"video": 3, "audio": 3} and cache.hits == {"video": 3, "audio": 3}
    assert "pixel_values_videos" in batches[0] and "pixel_values_videos" not in batches[1]


def test_tower_states_merged_are_the_video_tokens(frozen, rows):
    """tower_states puts each token's patch group side by side in token order (the tower's window order undone),
    so that the merger on them gives video_embeddings' tokens, for several videos at once."""
    model, proc = frozen
    batch = proc.collate([proc(r) for r in rows])
    with torch.no_grad():
        want = model.video_embeddings(batch["pixel_values_videos"], batch["video_grid_thw"])
        states = model.tower_states(batch["pixel_values_videos"], batch["video_grid_thw"])
        got = model.merge_tower_states(states)
    unit = model.visual.config.spatial_merge_size ** 2
    assert states.shape == (want.shape[0], unit * model.visual.config.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert isinstance(model.visual.merger, type(model.qwen.model.visual.merger)) and \
        type(model.visual.merger).__name__ != "MergeGroups"


def test_with_a_training_merger_the_cache_holds_tower_states(tiny_base, rows):
    """The paper's SFT / DPO train the merger: the video part then stores the frozen tower's output and the merger
    runs on it every step. Two steps with the cache (the second from it) equal two without: losses, and the
    merger's weights after the steps (its gradient flows through the cached states' merge)."""
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        module = SFTModule(base=str(tiny_base), stage="sft", trainable=["llm", "merger"], lr=1e-3,
                           cache_video_tokens=cached)
        module.configure_model()
        if cached:
            module.processor.use_media_cache(module.media_cache)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(2):
            loss = module(module.processor.collate([module.processor(r) for r in rows])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        merger = torch.cat([p.detach().flatten() for p in module.model.visual.merger.parameters()])
        results.append((losses, merger, module))
    (plain, m_plain, _), (cached, m_cached, module) = results
    assert plain == pytest.approx(cached, abs=1e-6)
    torch.testing.assert_close(m_plain, m_cached, atol=1e-6, rtol=0)
    cache = module.media_cache
    assert cache.video_stage(module.model) == "tower" and cache.misses["video"] == 3 and cache.hits["video"] == 3
    width = module.model.visual.config.hidden_size * module.model.visual.config.spatial_merge_size ** 2
    assert all(t.shape[1] == width for t in cache.stores["video"].values())


def test_worker_copies_of_the_processor_key_rows_but_hold_no_cache(frozen, rows):
    """A DataLoader worker gets a pickled processor: it must not carry a copy of the cache (stale from then on, and
    the size of every stored output), but still key its rows so that the model's side of the cache works."""
    import pickle

    model, proc = frozen
    cache = FrozenMediaCache()
    proc.use_media_cache(cache)
    proc(rows[0])
    worker = pickle.loads(pickle.dumps(proc))
    assert worker.media_cache is None and worker.media_keys and worker._layouts == {}
    sample = worker(rows[0])
    assert sample["media_key"] == proc(rows[0])["media_key"] and sample["pixel_values_videos"] is not None


def test_the_bound_keeps_the_first_outputs_and_stores_no_more(frozen, rows):
    """max_gb: outputs are stored while they fit and refused after (nothing evicted); the refused ones are
    computed again the next time, the stored ones are hits; outputs are the same either way."""
    model, proc = frozen
    proc.media_keys = True
    batch = proc.collate([proc(r) for r in rows])
    unbounded = FrozenMediaCache(["audio"])
    model.media_cache = unbounded
    want = embed(model, batch)
    sizes = [t.numel() * t.element_size() for t in unbounded.stores["audio"].values()]
    bounded = FrozenMediaCache(["audio"], max_gb=(sizes[0] + sizes[1] - 1) / 2**30)  # room for one of them
    model.media_cache = bounded
    for _ in range(2):
        torch.testing.assert_close(embed(model, batch), want, atol=1e-6, rtol=0)
    stats = bounded.stats()
    assert stats["entries"] == {"audio": 1} and stats["refused"] == 2 + 2
    assert bounded.hits["audio"] == 1 and bounded.misses["audio"] == 3 + 2
    assert bounded.bytes == sizes[0] == unbounded.bytes - sum(sizes[1:])
    with pytest.raises(ValueError, match="max_gb"):
        FrozenMediaCache(["audio"], max_gb=0)


def test_under_fsdp2_the_cached_encoders_get_no_units_of_their_own(tiny_base, monkeypatch):
    """A rank may hit the cache where another computes: the cached parts' encoders join the root unit (the
    2-process run: tests/test_media_cache_fsdp.py)."""
    from types import SimpleNamespace

    import src.models.sharding as sharding
    from src.lit.sft import shard_under_model_parallel

    calls, shard_model = [], sharding.shard_model
    monkeypatch.setattr(sharding, "shard_model", lambda model, mesh, **kwargs: calls.append(kwargs))
    module = SimpleNamespace(device_mesh=object(), trainer=SimpleNamespace(precision="bf16-mixed"))
    model, _ = load_base(tiny_base)
    shard_under_model_parallel(module, model, FrozenMediaCache(["audio"]))
    shard_under_model_parallel(module, model, None)
    assert calls == [{"param_dtype": torch.bfloat16, "whole": ["audio"]}, {"param_dtype": torch.bfloat16, "whole": []}]
    with pytest.raises(ValueError, match="media parts"):
        shard_model(model, object(), whole=["llm"])
