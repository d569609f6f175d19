"""Decoded-frame cache: same bytes as a fresh decode, misses on a changed file or setting, safe concurrent writes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.frame_cache import FrameCache, FrameCacheError, eval_frame_cache, open_frame_cache
from surgvqa.media import MediaError, load_frame


def _jpeg(path, seed: int = 0, size=(112, 84)) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return str(path)


def _cache_files(cache: FrameCache) -> list[str]:
    return sorted(
        os.path.join(root, f) for root, _, files in os.walk(cache.directory) for f in files
    )


class CountingDecoder:
    def __init__(self, size: int = 56) -> None:
        self.size, self.calls = size, 0

    def __call__(self, path) -> np.ndarray:
        self.calls += 1
        return load_frame(path, self.size)


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_byte_identical_to_a_fresh_decode(tmp_path, mode, test_set):
    cache = open_frame_cache(mode, tmp_path / "cache" if mode == "disk" else None)
    frames = sorted((test_set / "frames").rglob("*.jpg"))[:6]
    decode = CountingDecoder()
    first = [cache.get(p, ("frame", 56), lambda p=p: decode(p)) for p in frames]
    again = [cache.get(p, ("frame", 56), lambda p=p: decode(p)) for p in frames]
    assert decode.calls == len(frames) and cache.hits == len(frames)
    for path, a, b in zip(frames, first, again, strict=True):
        fresh = load_frame(path, 56)
        assert b.dtype == np.uint8 and b.shape == fresh.shape and b.tobytes() == fresh.tobytes() == a.tobytes()
    # a consumer writing into a returned frame never changes the cache
    again[0][...] = 0
    assert cache.get(frames[0], ("frame", 56), lambda: decode(frames[0])).tobytes() == first[0].tobytes()
    if mode == "disk":
        assert len(_cache_files(cache)) == len(frames)
        # a new process (a fresh cache object on the same directory) reads what this one wrote
        other = open_frame_cache("disk", tmp_path / "cache")
        assert other.get(frames[1], ("frame", 56), lambda: pytest.fail("decoded again")).tobytes() == \
            first[1].tobytes()


def test_misses_when_the_file_or_a_setting_changes(tmp_path):
    cache = open_frame_cache("disk", tmp_path / "cache")
    path = _jpeg(tmp_path / "f.jpg", seed=1)
    decode = CountingDecoder(56)
    a = cache.get(path, ("frame", 56), lambda: decode(path))
    cache.get(path, ("frame", 56), lambda: decode(path))
    assert decode.calls == 1
    # another size is another entry
    b = cache.get(path, ("frame", 84), lambda: load_frame(path, 84))
    assert b.shape != a.shape and len(_cache_files(cache)) == 2
    # the file is rewritten with other pixels (and a later mtime): a miss, the new pixels come back
    _jpeg(tmp_path / "f.jpg", seed=2)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    c = cache.get(path, ("frame", 56), lambda: decode(path))
    assert decode.calls == 2 and c.tobytes() == load_frame(path, 56).tobytes() != a.tobytes()
    # same size and mtime but another file (replaced by rename: a new inode) also misses
    replacement = _jpeg(tmp_path / "g.jpg", seed=3)
    os.utime(replacement, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))
    os.replace(replacement, path)
    cache.get(path, ("frame", 56), lambda: decode(path))
    assert decode.calls == 3
    # a changed decoder (a library version, or surgvqa's decode revision) changes the key
    other = open_frame_cache("disk", tmp_path / "cache")
    other.fingerprint = "another-decoder"
    other.get(path, ("frame", 56), lambda: decode(path))
    assert decode.calls == 4


def test_the_key_is_built_from_decoder_versions_and_resize_settings(tmp_path, monkeypatch):
    """The frame cache's key changes when a decoding library's version (Pillow, PyAV, numpy, ...) or surgvqa's
    decode revision changes, or when the resize settings do; not when surgvqa's source text does."""
    import surgvqa.frame_cache as frame_cache
    import surgvqa.media as media

    versions = frame_cache.decoder_versions()
    assert {"pillow", "av", "numpy", "surgvqa.media"} <= set(versions)
    base = frame_cache.decoder_fingerprint(versions)
    for name in ("pillow", "av", "numpy", "surgvqa.media"):
        assert frame_cache.decoder_fingerprint({**versions, name: versions[name] + ".1"}) != base, name
    with monkeypatch.context() as patch:
        patch.setattr(media, "DECODE_REVISION", media.DECODE_REVISION + 1)
        assert frame_cache.decoder_fingerprint() != base
    monkeypatch.setattr(frame_cache, "decoder_versions", lambda: {**versions, "av": "0.0.0"})
    path = _jpeg(tmp_path / "f.jpg", seed=1)
    old = open_frame_cache("memory")
    monkeypatch.setattr(frame_cache, "decoder_versions", lambda: versions)
    new = open_frame_cache("memory")
    assert new.fingerprint == base != old.fingerprint
    assert new.key(path, ("frame", 56, 28)) != old.key(path, ("frame", 56, 28))
    assert new.key(path, ("frame", 56, 28)) != new.key(path, ("frame", 84, 28)) != new.key(path, ("frame", 84, 32))


def test_missing_file_raises_the_decoders_error_and_caches_nothing(tmp_path):
    cache = open_frame_cache("disk", tmp_path / "cache")
    with pytest.raises(MediaError, match="not found"):
        cache.get(tmp_path / "nope.jpg", ("frame", 56), lambda: load_frame(tmp_path / "nope.jpg", 56))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(MediaError):
        cache.get(bad, ("frame", 56), lambda: load_frame(bad, 56))
    assert _cache_files(cache) == []


def test_a_damaged_entry_is_decoded_again_not_returned(tmp_path):
    cache = open_frame_cache("disk", tmp_path / "cache")
    path = _jpeg(tmp_path / "f.jpg")
    good = cache.get(path, ("frame", 56), lambda: load_frame(path, 56))
    entry = cache.entry_path(cache.key(path, ("frame", 56)))
    with open(entry, "r+b") as fh:  # cut it short
        fh.truncate(os.path.getsize(entry) - 10)
    decode = CountingDecoder()
    again = cache.get(path, ("frame", 56), lambda: decode(path))
    assert decode.calls == 1 and again.tobytes() == good.tobytes()
    assert cache.get(path, ("frame", 56), lambda: decode(path)).tobytes() == good.tobytes() and decode.calls == 1


def _same_size_jpegs(tmp_path, seeds=(1, 2)) -> list[bytes]:
    """JPEG bytes of different pixels, padded with a comment segment to one byte size."""
    raw = []
    for seed in seeds:
        _jpeg(tmp_path / "tmp.jpg", seed=seed)
        raw.append((tmp_path / "tmp.jpg").read_bytes())
    longest = max(len(r) for r in raw)
    out = []
    for seed, r in zip(seeds, raw, strict=True):
        pad = longest - len(r)
        if pad:
            rng = np.random.default_rng(seed)
            image = Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8))
            image.save(tmp_path / "tmp.jpg", quality=90, comment=b"x" * (pad - 4))  # COM segment: 4 + len bytes
            r = (tmp_path / "tmp.jpg").read_bytes()
        out.append(r)
    assert len({len(r) for r in out}) == 1 and out[0] != out[1]
    return out


def test_a_same_size_rewrite_with_its_mtime_restored_misses(tmp_path):
    """rsync -t / cp -p / tar x: other pixels, the same byte size, the old mtime (and inode: rewritten in place)."""
    old, new = _same_size_jpegs(tmp_path)
    path = tmp_path / "f.jpg"
    path.write_bytes(old)
    before = os.stat(path)
    cache = open_frame_cache("disk", tmp_path / "cache")
    stale = cache.get(path, ("frame", 56), lambda: load_frame(path, 56))
    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    fresh = load_frame(path, 56)
    assert fresh.tobytes() != stale.tobytes()
    for reader in (cache, open_frame_cache("disk", tmp_path / "cache"), open_frame_cache("memory")):
        assert reader.get(path, ("frame", 56), lambda: load_frame(path, 56)).tobytes() == fresh.tobytes()
    # the content, not the path, is the key: a copy elsewhere is served from the cache
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(new)
    assert cache.get(copy, ("frame", 56), lambda: pytest.fail("decoded again")).tobytes() == fresh.tobytes()


def test_a_zeroed_entry_fails_its_checksum_is_decoded_again_and_reported_once(tmp_path, caplog):
    cache = open_frame_cache("disk", tmp_path / "cache")
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(2)]
    good = [cache.get(p, ("frame", 56), lambda p=p: load_frame(p, 56)) for p in paths]
    for p, array in zip(paths, good, strict=True):  # zero the pixels, keep the header and the length
        entry = cache.entry_path(cache.key(p, ("frame", 56)))
        size = os.path.getsize(entry)
        with open(entry, "r+b") as fh:
            np.lib.format.read_magic(fh)
            np.lib.format.read_array_header_1_0(fh)
            fh.write(bytes(array.nbytes))  # from the first pixel on
        assert os.path.getsize(entry) == size
    reader = open_frame_cache("disk", tmp_path / "cache")  # a later process
    decode = CountingDecoder()
    with caplog.at_level("WARNING", logger="surgvqa.frame_cache"):
        again = [reader.get(p, ("frame", 56), lambda p=p: decode(p)) for p in paths]
    assert [a.tobytes() for a in again] == [g.tobytes() for g in good]  # not black frames
    assert decode.calls == 2 and reader.stats()["damaged"] == 2
    reports = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(reports) == 1 and "decoding the frame again" in reports[0].getMessage()
    # rewritten: whole again
    assert reader.get(paths[0], ("frame", 56), lambda: decode(paths[0])).tobytes() == good[0].tobytes()
    assert decode.calls == 2


def test_bounded(tmp_path):
    paths = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    one = load_frame(paths[0], 56).nbytes
    cache = FrameCache("disk", tmp_path / "cache", max_gb=(2.5 * (one + 128)) / 1024**3)
    decode = CountingDecoder()
    for p in paths:
        cache.get(p, ("frame", 56), lambda p=p: decode(p))
    assert len(_cache_files(cache)) == 2 and cache.uncached == 4
    for p in paths:  # still correct when full: the rest is decoded every time
        assert cache.get(p, ("frame", 56), lambda p=p: decode(p)).tobytes() == load_frame(p, 56).tobytes()
    memory = FrameCache("memory", max_gb=(1.5 * one) / 1024**3)
    for p in paths:
        memory.get(p, ("frame", 56), lambda p=p: load_frame(p, 56))
    assert len(memory._memory) == 1
    # a cache over its bound when opened is pruned, oldest entries first
    smaller = FrameCache("disk", tmp_path / "cache", max_gb=(1.5 * (one + 128)) / 1024**3)
    assert len(_cache_files(smaller)) == 1


def test_pruning_never_touches_foreign_files(tmp_path):
    root = tmp_path / "shared"
    (root / "v1" / "ab").mkdir(parents=True)
    foreign = [root / "notes.txt", root / "v1" / "ab" / "keep.npy", root / "v1" / "ab" / "x.tmp"]
    for f in foreign:
        f.write_bytes(b"x" * 1000)
    FrameCache("disk", root, max_gb=0)
    assert all(f.is_file() for f in foreign)


class _SameFrameTwice(Dataset):
    """Two items that decode the same file slowly, so both DataLoader workers miss and write the same entry."""

    def __init__(self, cache: FrameCache, path: str) -> None:
        self.cache, self.path = cache, path

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        def slow_decode():
            frame = load_frame(self.path, 56)
            time.sleep(0.5)
            return frame

        return self.cache.get(self.path, ("frame", 56), slow_decode), self.cache.misses


def test_two_dataloader_workers_writing_one_entry_leave_one_valid_file(tmp_path):
    path = _jpeg(tmp_path / "f.jpg")
    cache = open_frame_cache("disk", tmp_path / "cache")
    loader = DataLoader(_SameFrameTwice(cache, path), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    results = list(loader)
    assert [misses for _, misses in results] == [1, 1], "both workers should have decoded and written"
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].endswith(".npy"), files  # no temp file left behind
    fresh = load_frame(path, 56)
    assert all(np.asarray(frame).tobytes() == fresh.tobytes() for frame, _ in results)
    assert np.load(files[0]).tobytes() == fresh.tobytes()
    assert open_frame_cache("disk", tmp_path / "cache").get(path, ("frame", 56), lambda: pytest.fail()).tobytes() \
        == fresh.tobytes()


def test_dataset_with_cache_equals_dataset_without(tmp_path, test_set):
    media = MediaConfig(frames_dir=str(test_set / "frames"), frame_size=56, max_frames=6)
    samples, problems = load_samples(test_set / "in_002-001.jsonl", media)
    assert not problems
    plain = SurgicalVQADataset(samples[:5], media)
    cache = open_frame_cache("disk", tmp_path / "cache")
    cached = SurgicalVQADataset(samples[:5], media, frame_cache=cache)
    for _epoch in range(2):
        for i in range(5):
            a, b = plain[i]["frames"], cached[i]["frames"]
            assert len(a) == len(b) == 6
            assert all(x.tobytes() == y.tobytes() and x.shape == y.shape for x, y in zip(a, b, strict=True))
    assert cache.hits >= 30  # the second epoch read everything back
    ablated = SurgicalVQADataset(samples[:1], MediaConfig(frames_dir=str(test_set / "frames"), frame_size=56,
                                                           ablate="video"), video_fill=(1, 2, 3), frame_cache=cache)
    constant = ablated[0]["frames"]
    assert all((f == np.array([1, 2, 3], dtype=np.uint8)).all() for f in constant)  # ablation applies after the cache
    assert cached[0]["frames"][0].tobytes() == plain[0]["frames"][0].tobytes()  # and never reaches the cache


def test_settings_are_checked_and_evaluation_reuses_the_training_cache(tmp_path):
    with pytest.raises(FrameCacheError, match="none, memory, disk"):
        open_frame_cache("ram")
    with pytest.raises(FrameCacheError, match=">= 0"):
        open_frame_cache("memory", max_gb=-1)
    assert open_frame_cache("none") is None
    assert eval_frame_cache(None, None, None, None) is None
    trained = open_frame_cache("disk", tmp_path / "train-cache")
    recorded = {"mode": "disk", "dir": str(trained.directory.parent)}
    reused = eval_frame_cache(None, None, None, recorded)
    assert reused.mode == "disk" and reused.directory == trained.directory
    assert eval_frame_cache("memory", None, None, recorded).mode == "memory"
    with pytest.raises(FrameCacheError, match="frame_cache_dir"):
        eval_frame_cache("disk", None, None, None)
