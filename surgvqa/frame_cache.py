"""Decoded-frame cache: each frame file is decoded and resized once, then read back as uint8 on every later use.

A clip's frames are decoded again for every question asked about it and again every epoch; decoding and resizing a
1352x1080 JPEG costs tens of milliseconds, reading back its resized uint8 pixels a few microseconds. Modes:

* ``disk`` (the default for training): one ``.npy`` file per (frame file, decode settings) under a cache directory,
  read back memory-mapped (copy-on-write, so a consumer that writes into a frame never touches the cache). Shared by
  every question on a clip, every epoch, every DataLoader worker (they are re-created each epoch), every DDP rank and
  the in-training evaluation, and by later runs that pass the same ``--frame_cache_dir``.
* ``memory``: a dict in this process (each DataLoader worker holds its own copy, lost when the worker exits). Good
  for one pass over a set where clips repeat, e.g. evaluation.
* ``none``: decode every time.

Never stale: the key hashes the bytes of the frame file (:func:`content_digest`: xxHash3-128; never its path,
size or times, which a rewrite that keeps them, e.g. ``rsync -t`` or ``cp -p``, would leave unchanged), the caller's
resize settings (pixel budget, vision grid) and the decoders' versions (:func:`decoder_fingerprint`: the libraries
and surgvqa's decode revision), so a changed file, setting or decoder misses, and a file moved or copied elsewhere
hits. Hashing a JPEG costs microseconds; decoding it milliseconds (``benchmarks/train_step.py`` measures the check).
Never damaged: every disk entry ends with a checksum of its pixels, verified on every read; an entry that fails it
(or is cut short) is decoded again, rewritten, and reported once per process. Bounded: entries are added until
``max_bytes`` is reached, after which frames are decoded without caching (a training loop reads every frame every
epoch, so keeping a fixed subset beats evicting, which would miss on every read once the set is larger than the
bound); a disk cache over its bound when it is opened is pruned, least recently written first. Safe under
concurrent writers: an entry is written to a temporary file in its own directory and renamed into place with
``os.replace``, so readers see a whole file or none; two writers of one entry write the same bytes and the last
rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import xxhash

from surgvqa import media
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

FRAME_CACHE_MODES = ("none", "memory", "disk")
#: the default bound of a disk cache: REAL-Colon-VQA's train and test frames at 384 px take ~21 GB.
DEFAULT_MAX_GB = 32.0
#: the default bound of a memory cache (per process: every DataLoader worker holds its own).
DEFAULT_MEMORY_MAX_GB = 4.0
#: bumped when the on-disk layout changes; old entries then live in a directory nobody reads (pruned by size).
#: 2: content-addressed keys, a checksum of the pixels after the array
FORMAT_VERSION = 2
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_RE = re.compile(rb"^\{'descr': '\|u1', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}\s*\n$")


class FrameCacheError(UserError):
    """The cache cannot be used as configured (bad mode, unusable directory)."""


#: what decodes and resizes frames: simplejpeg (JPEGs), Pillow (other images), numpy, transformers' ``smart_resize``
#: (pixel budgets), torchvision (resize), PyAV (video files); and surgvqa's own code (``media.DECODE_REVISION``)
DECODERS = ("simplejpeg", "pillow", "numpy", "transformers", "torchvision", "av")


def decoder_versions() -> dict[str, str]:
    versions = {"surgvqa.media": str(media.DECODE_REVISION)}
    for package in DECODERS:
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return versions


def decoder_fingerprint(versions: dict[str, str] | None = None) -> str:
    """What the cached pixels depend on besides the file and the resize settings: the decoders' versions."""
    versions = decoder_versions() if versions is None else versions
    return hashlib.sha256(repr(sorted(versions.items())).encode()).hexdigest()[:16]


#: the content hash of keys and checksums (xxHash3, ~50x faster than BLAKE2b; a declared dependency)
HASH_NAME = "xxh3_128"


def _hash(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


#: bytes of the checksum that ends every disk entry
CHECKSUM_BYTES = 16


def content_digest(path: str | os.PathLike[str]) -> str:
    """Hex hash (:data:`HASH_NAME`) of the file's bytes; raises OSError when it cannot be read."""
    with open(path, "rb") as fh:
        return _hash(fh.read()).hex()


class FrameCache:
    """``get(path, settings, decode)``: the uint8 array ``decode()`` returns for ``path``, decoded at most once.

    ``settings`` is anything hashable with a stable ``repr`` that, with the file, determines the pixels (e.g.
    ``("frame", 384)``). ``decode`` is called on a miss; it must return a uint8 array and raise for a bad file
    (nothing is cached then). Pickles for DataLoader workers (the memory dict is copied, the disk directory shared).
    :meth:`source_digest` and :meth:`array_digest` are the content checks (the benchmark swaps them to price them).
    """

    def __init__(self, mode: str = "disk", directory: str | os.PathLike[str] | None = None,
                 max_gb: float = DEFAULT_MAX_GB) -> None:
        check_frame_cache_settings(mode, max_gb)
        if mode == "disk" and directory is None:
            raise FrameCacheError("--frame_cache disk needs a directory (--frame_cache_dir or the output directory)")
        self.mode = mode
        self.max_bytes = int(max_gb * 1024**3)
        self.fingerprint = decoder_fingerprint() if mode != "none" else ""
        self.directory: Path | None = None
        self._dir_str = ""
        self._memory: dict[str, np.ndarray] = {}
        self._bytes = 0  # memory: bytes held; disk: bytes in the directory when last counted + written since
        self._written_since_count = 0
        self._full = False
        self._damage_reported = False
        self._lock = threading.Lock()
        self.hits = self.misses = self.uncached = self.damaged = 0
        if mode == "disk":
            self.directory = Path(directory).expanduser().resolve() / f"v{FORMAT_VERSION}"
            self._dir_str = str(self.directory)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise FrameCacheError(f"cannot create the frame cache directory {self.directory}: {err}; "
                                      "pass --frame_cache_dir DIR on a writable disk or --frame_cache none") from err
            self._bytes = self._prune()

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"FrameCache(mode={self.mode!r}{where}, max_gb={self.max_bytes / 1024**3:g})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- the one call ------------------------------------------------------------------------------------
    def get(self, path: str | os.PathLike[str], settings: Hashable, decode: Callable[[], np.ndarray]) -> np.ndarray:
        if self.mode == "none":
            return decode()
        try:
            key = self.key(path, settings)
        except OSError:  # missing or unreadable: the decoder raises the error that names the file
            return decode()
        if self.mode == "memory":
            cached = self._memory.get(key)
            if cached is not None:
                self.hits += 1
                return cached.copy()
            array = self._checked(decode(), path)
            self.misses += 1
            with self._lock:
                if self._bytes + array.nbytes <= self.max_bytes:
                    self._memory[key] = array.copy()
                    self._bytes += array.nbytes
                else:
                    self._note_full()
            return array
        entry = self.entry_path(key)
        cached = self._read(entry)
        if isinstance(cached, np.ndarray):
            self.hits += 1
            return cached
        if cached is _DAMAGED:
            self._note_damaged(entry, path)
        array = self._checked(decode(), path)
        self.misses += 1
        self._write(entry, array)
        return array

    def key(self, path: str | os.PathLike[str], settings: Hashable) -> str:
        """Hex digest of (the file's content hash, settings, decoder fingerprint); reads the file."""
        material = f"{self.source_digest(path)}\0{settings!r}\0{self.fingerprint}"
        return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    def source_digest(self, path: str | os.PathLike[str]) -> str:
        """What identifies the frame file: the hash of its bytes, named by its algorithm."""
        return f"{HASH_NAME}:{content_digest(path)}"

    @staticmethod
    def array_digest(data) -> bytes:
        """The checksum a disk entry stores after its pixels (:data:`CHECKSUM_BYTES` bytes)."""
        return _hash(data)

    def entry_path(self, key: str) -> str:
        return os.path.join(self._dir_str, key[:2], key + ".npy")

    def stats(self) -> dict[str, int | str | float]:
        """Counts of this process (each DataLoader worker counts its own)."""
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses, "uncached": self.uncached,
                "damaged": self.damaged, "bytes": self._bytes, "max_bytes": self.max_bytes}

    # -- internals ---------------------------------------------------------------------------------------
    @staticmethod
    def _checked(array: np.ndarray, path) -> np.ndarray:
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
            raise TypeError(f"frame decoder returned {type(array).__name__} "
                            f"{getattr(array, 'dtype', '')} for {path}; the cache holds uint8 arrays only")
        return array

    def _read(self, entry: str) -> np.ndarray | object | None:
        """The entry's pixels when whole and matching their checksum; :data:`_DAMAGED` when the file exists but is
        not; None when there is no entry."""
        found = _read_entry(entry)
        if found is None or found is _DAMAGED:
            return found
        mapped, offset, shape, count = found
        if len(mapped) != offset + count + CHECKSUM_BYTES:
            return _DAMAGED
        with memoryview(mapped) as view:
            ok = self.array_digest(view[offset:offset + count]) == mapped[offset + count:]
        if not ok:
            return _DAMAGED
        return np.frombuffer(mapped, dtype=np.uint8, count=count, offset=offset).reshape(shape)

    def _note_damaged(self, entry: str, path) -> None:
        self.damaged += 1
        if not self._damage_reported:
            self._damage_reported = True
            logger.warning("frame cache entry %s (of %s) is damaged: it fails its checksum or is cut short; decoding "
                           "the frame again and rewriting the entry (further damaged entries are counted in the "
                           "cache's stats, not reported)", entry, path)

    def _recount(self) -> None:
        self._bytes = _directory_bytes(self.directory)
        self._written_since_count = 0

    def _note_full(self) -> None:
        if not self._full:
            self._full = True
            where = f" ({self.directory})" if self.directory else ""
            logger.warning(
                "frame cache%s reached its bound of %.1f GB: further frames are decoded without caching; raise "
                "--frame_cache_max_gb or point --frame_cache_dir at a larger disk", where, self.max_bytes / 1024**3)
        self.uncached += 1

    def _write(self, entry: str, array: np.ndarray) -> None:
        size = array.nbytes + 128 + CHECKSUM_BYTES
        with self._lock:
            # other processes (workers, ranks) write to the same directory: recount after every 1/16 of the bound
            # written here, and once more before declaring the cache full
            if self._written_since_count > self.max_bytes // 16:
                self._recount()
            if not self._full and self._bytes + size > self.max_bytes and self._written_since_count:
                self._recount()
            if self._full or self._bytes + size > self.max_bytes:
                self._note_full()
                return
            self._bytes += size
            self._written_since_count += size
        shard, name = os.path.split(entry)
        try:
            os.makedirs(shard, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name[:8]}-", suffix=".tmp", dir=shard)
            try:
                with os.fdopen(fd, "wb") as fh:
                    contiguous = np.ascontiguousarray(array)
                    np.lib.format.write_array(fh, contiguous, allow_pickle=False)
                    fh.write(self.array_digest(contiguous.reshape(-1)))
                os.replace(tmp, entry)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as err:  # disk full, read-only, quota: run on uncached rather than fail the training
            with self._lock:
                if not self._full:
                    logger.warning("cannot write to the frame cache %s (%s): decoding without caching from now on",
                                   self.directory, err)
                self._full = True
            self.uncached += 1

    def _prune(self) -> int:
        """Bytes in the cache directory after removing the oldest entries (and stale temp files) over the bound."""
        files = []
        for path, st in _entries(self.directory.parent):
            if path.name.endswith(".tmp"):
                if time.time() - st.st_mtime > 3600:  # left by a writer that died mid-write
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            files.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return total
        target = int(self.max_bytes * 0.9)
        removed = 0
        for _, size, path in sorted(files):
            if total <= target:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed += 1
        logger.info("frame cache %s was over its bound of %.1f GB: removed the %d oldest entries",
                    self.directory.parent, self.max_bytes / 1024**3, removed)
        return total


_HEADERS: dict[bytes, tuple[tuple[int, ...], int] | None] = {}


def _parse_header(header: bytes) -> tuple[tuple[int, ...], int] | None:
    """(shape, element count) of a C-order uint8 .npy header; None for anything else. Memoized: few shapes recur."""
    if header not in _HEADERS:
        match = _HEADER_RE.match(header)
        if match is None:
            parsed = None
        else:
            shape = tuple(int(x) for x in match.group(1).split(b",") if x.strip())
            parsed = (shape, int(np.prod(shape, dtype=np.int64)))
        if len(_HEADERS) < 1024:
            _HEADERS[header] = parsed
        return parsed
    return _HEADERS[header]


#: an entry file that exists but cannot be used (cut short, not ours, failing its checksum)
_DAMAGED = object()


def _read_entry(entry: str) -> tuple[mmap.mmap, int, tuple[int, ...], int] | object | None:
    """(the file memory-mapped copy-on-write, offset, shape and size of its uint8 pixels); None when there is no
    file, :data:`_DAMAGED` when it does not start as a uint8 .npy file with all its pixels."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return None
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):  # an empty file cannot be mapped
        return _DAMAGED
    finally:
        os.close(fd)
    if mapped[:8] != _NPY_MAGIC:
        return _DAMAGED
    header_len = int.from_bytes(mapped[8:10], "little")
    parsed = _parse_header(mapped[10:10 + header_len])
    if parsed is None or len(mapped) < 10 + header_len + parsed[1]:
        return _DAMAGED
    return mapped, 10 + header_len, parsed[0], parsed[1]


_VERSION_DIR = re.compile(r"^v\d+$")
_SHARD_DIR = re.compile(r"^[0-9a-f]{2}$")
_ENTRY_FILE = re.compile(r"^(?:[0-9a-f]{40}\.npy|\.[0-9a-f]{8}-.*\.tmp)$")


def _entries(root: Path):
    """(path, stat) of every cache file under ``root`` (``v<N>/<2 hex>/<40 hex>.npy`` and our temp files only:
    a ``--frame_cache_dir`` that holds other files never has them counted or removed)."""
    for level1 in _scandir(root, _VERSION_DIR):
        for level2 in _scandir(level1.path, _SHARD_DIR):
            for leaf in _scandir(level2.path, _ENTRY_FILE, files=True):
                try:
                    yield Path(leaf.path), leaf.stat(follow_symlinks=False)
                except OSError:
                    continue


def _scandir(path, pattern: re.Pattern, files: bool = False) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if pattern.match(e.name)
                    and (e.is_file(follow_symlinks=False) if files else e.is_dir(follow_symlinks=False))]
    except OSError:
        return []


def _directory_bytes(directory: Path) -> int:
    return sum(st.st_size for path, st in _entries(directory.parent) if not path.name.endswith(".tmp"))


def check_frame_cache_settings(mode: str | None, max_gb: float | None = None,
                               directory: str | os.PathLike[str] | None = None) -> None:
    """Refuse an unknown mode, a negative bound, or a directory given to a mode that keeps none (it would be
    ignored: the user asked for a cache there and would not get one), before anything is loaded."""
    if mode is None:
        return
    if mode not in FRAME_CACHE_MODES:
        raise FrameCacheError(f"--frame_cache must be one of {', '.join(FRAME_CACHE_MODES)}, got {mode!r}")
    if directory is not None and mode != "disk":
        raise FrameCacheError(
            f"--frame_cache {mode} keeps no files, so --frame_cache_dir {directory} would be ignored: pass "
            f"--frame_cache disk to cache frames there, or drop --frame_cache_dir"
        )
    if max_gb is not None and max_gb < 0:
        raise FrameCacheError(f"--frame_cache_max_gb must be >= 0, got {max_gb}")


def open_frame_cache(mode: str, directory: str | os.PathLike[str] | None = None, max_gb: float | None = None, *,
                     default_directory: str | os.PathLike[str] | None = None) -> FrameCache | None:
    """The cache a run asked for: ``None`` for ``none``; ``disk`` without ``directory`` uses ``default_directory``;
    ``max_gb`` None means 32 GB on disk and 4 GB in memory."""
    check_frame_cache_settings(mode, max_gb, directory)
    if mode == "none":
        return None
    if max_gb is None:
        max_gb = DEFAULT_MAX_GB if mode == "disk" else DEFAULT_MEMORY_MAX_GB
    if mode == "disk":
        return FrameCache("disk", directory if directory is not None else default_directory, max_gb)
    return FrameCache("memory", None, max_gb)


def eval_frame_cache(mode: str | None, directory: str | os.PathLike[str] | None, max_gb: float | None,
                     recorded: dict | None) -> FrameCache | None:
    """Evaluation's cache. ``mode`` None: the training run's disk cache (``recorded``, from surgvqa_config.json)
    when it still exists, else none: a single pass rarely sees a frame twice, so a new cache would only cost disk or
    memory. ``disk`` without ``directory`` also uses the recorded one."""
    recorded_dir = (recorded or {}).get("dir") if (recorded or {}).get("mode") == "disk" else None
    if mode is None:
        if recorded_dir and Path(recorded_dir).is_dir() and directory is None:
            logger.info("reusing the training run's frame cache %s", recorded_dir)
            return open_frame_cache("disk", recorded_dir, max_gb)
        mode = "disk" if directory is not None else "none"
    if mode == "disk" and directory is None and recorded_dir is None:
        raise FrameCacheError("--frame_cache disk needs --frame_cache_dir (the checkpoint records no disk cache)")
    return open_frame_cache(mode, directory, max_gb, default_directory=recorded_dir)
