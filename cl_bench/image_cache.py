"""Decode a domain's images once into an on-disk uint8 cache, and open it memory-mapped.

The multi-domain benchmarks (X-TAIL, MTIL) read real image folders: ~90k test images of mixed
sizes and modes, 13.5 GB as uint8 at 224 px. Decoding them takes minutes, so every split is
decoded once, with all cores, through CLIP's evaluation transform (:func:`eval_transform`) into
a raw ``uint8 [N, 3, size, size]`` file; later runs map that file instead of decoding
(``MULTIDOMAIN.md`` §2: PIL decode, ``convert('RGB')`` first, PIL bicubic resize).

A cache is ``<cache_dir>/<key>.uint8`` plus ``<key>.json`` (the sidecar: count, size, what the
key was made of, the undecodable files). The key hashes the transform (name, size, format
version) and the inputs: for files every (absolute path, size, mtime_ns), for arrays their
bytes, so touching or replacing any file gives a new cache. A build writes a temporary file and
renames it when complete, and writes the sidecar last: a killed build leaves no cache that a
later call would open. A lock file makes concurrent runs of a sweep build a split once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, ImageFile

from cl_bench import progress as progress_
from cl_bench.errors import DataError

if TYPE_CHECKING:  # a type only: importing the scenarios package would pull in Avalanche
    from scenarios.domains.base import Split

log = logging.getLogger(__name__)

TRANSFORM = "clip-eval:pil-convert-rgb,resize-shorter-bicubic,center-crop"
FORMAT_VERSION = 1  # bump when the file layout or the transform's output changes
CHUNK = 64  # images per worker task
SHOWN_BAD = 5  # bad paths named in an error or a warning


def eval_transform(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's evaluation preprocessing of one image as uint8 [3, size, size].

    ``convert('RGB')`` first, so greyscale, CMYK, palette and RGBA images all end as RGB (PIL's
    own conversion: RGBA just drops alpha, it is not composited on a background). Then the
    shorter side is resized to ``size`` with PIL bicubic and the centre ``size`` x ``size`` is
    cropped, with the same output sizes and rounding as torchvision's
    ``Compose([Resize(size, BICUBIC), CenterCrop(size)])`` on a PIL image, so the result is
    bit-identical to it (the other side is ``int(size * long / short)``, the crop's corner
    ``round((side - size) / 2)``).
    """
    rgb = image.convert("RGB")
    w, h = rgb.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = round((new_h - size) / 2.0)  # Python rounds half to even, as torchvision does
    left = round((new_w - size) / 2.0)
    crop = rgb.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def decode_file(path: str | Path, size: int) -> np.ndarray:
    """Open, fully decode and transform one image file; a corrupt or truncated file raises
    (``Image.load()`` with PIL's ``LOAD_TRUNCATED_IMAGES`` off)."""
    with _truncated_images_refused(), Image.open(path) as image:
        image.load()
        return eval_transform(image, size)


@dataclass(frozen=True)
class CachedImages:
    """A split's decoded images: ``images`` uint8 [len(kept), 3, size, size], memory-mapped
    from ``path`` (rows are read from disk when indexed); ``kept`` the indices of the split's
    samples they are (all of them unless ``skip_bad`` dropped some); ``hit`` whether the cache
    existed; ``seconds`` the time this call took."""

    images: torch.Tensor
    kept: np.ndarray
    path: Path
    hit: bool
    seconds: float


def cached_images(
    split: Split,
    size: int,
    cache_dir: str | Path,
    *,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    label: str = "images",
) -> CachedImages:
    """The split's images through :func:`eval_transform` at ``size``, from the cache under
    ``cache_dir`` (built first when missing or stale; ``workers`` processes, 0: every CPU the
    process may use). Undecodable images fail with a :class:`DataError` naming them, or with
    ``skip_bad`` are dropped (``kept``, the sidecar and a warning say which)."""
    started = time.perf_counter()
    if size < 1:
        raise DataError(f"{label}: image size must be >= 1, got {size}")
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{label}: cannot create the image cache folder {cache_dir} ({e.strerror})") from None
    inputs = _key_inputs(split, size, label)
    key = _digest(inputs)
    data_path, sidecar_path = cache_dir / f"{key}.uint8", cache_dir / f"{key}.json"
    with FileLock(cache_dir / f"{key}.lock"):
        sidecar = _read_valid_sidecar(data_path, sidecar_path, size)
        hit = sidecar is not None
        if sidecar is None:
            sidecar = _build(split, size, data_path, sidecar_path, inputs, workers, skip_bad, progress, label)
    bad = sidecar["bad"]
    if bad:
        message = _bad_message(label, len(split), bad)
        if not skip_bad:
            raise DataError(f"{message}; set scenario.skip_bad_images = true to drop them")
        log.warning("%s; dropped them (skip_bad)", message)
    kept = np.setdiff1d(np.arange(len(split), dtype=np.int64), np.array([b["index"] for b in bad], np.int64))
    return CachedImages(
        images=_open(data_path, len(kept), size),
        kept=kept,
        path=data_path,
        hit=hit,
        seconds=time.perf_counter() - started,
    )


# -- the key


def _key_inputs(split: Split, size: int, label: str) -> dict[str, Any]:
    """What the cache's content depends on; hashed into the key, summarised in the sidecar."""
    transform = {"name": TRANSFORM, "size": size, "version": FORMAT_VERSION}
    if split.arrays is not None:
        arrays = _checked_arrays(split.arrays, label)
        digest = hashlib.sha256(arrays.reshape(-1).data).hexdigest()
        return {
            "transform": transform,
            "source": "arrays",
            "count": len(split),
            "shape": list(arrays.shape),
            "sha256": digest,
        }
    files = hashlib.sha256()
    total = 0
    for path in split.files:
        absolute = Path(path).absolute()
        try:
            stat = absolute.stat()
        except OSError as e:
            raise DataError(f"{label}: cannot read image file {absolute} ({e.strerror})") from None
        files.update(f"{absolute}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
    return {
        "transform": transform,
        "source": "files",
        "count": len(split),
        "first": str(Path(split.files[0]).absolute()) if split.files else "",
        "last": str(Path(split.files[-1]).absolute()) if split.files else "",
        "bytes": total,
        "files_sha256": files.hexdigest(),
    }


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _checked_arrays(arrays: np.ndarray, label: str) -> np.ndarray:
    grey = arrays.ndim == 3
    rgb = arrays.ndim == 4 and arrays.shape[3] == 3
    if arrays.dtype != np.uint8 or not (grey or rgb):
        raise DataError(
            f"{label}: image arrays must be uint8 [N, H, W] or [N, H, W, 3], "
            f"got {arrays.dtype} {tuple(arrays.shape)}"
        )
    return np.ascontiguousarray(arrays)


# -- opening


def _read_valid_sidecar(data_path: Path, sidecar_path: Path, size: int) -> dict[str, Any] | None:
    """The sidecar of a complete cache; None when either file is missing or they disagree."""
    try:
        sidecar = json.loads(sidecar_path.read_text())
        length = data_path.stat().st_size
    except (OSError, ValueError):
        return None
    if sidecar.get("size") != size or length != sidecar.get("count", -1) * 3 * size * size:
        return None
    return sidecar


def _open(data_path: Path, count: int, size: int) -> torch.Tensor:
    """The cache file as a uint8 [count, 3, size, size] tensor over a private (copy-on-write)
    memory map: nothing is read until indexed, and the tensor is writable (no torch warning)."""
    if count == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    mapped = np.memmap(data_path, dtype=np.uint8, mode="c", shape=(count, 3, size, size))
    return torch.from_numpy(mapped)


# -- building


@dataclass(frozen=True)
class _Chunk:
    """One worker task: decode the samples ``start..start+len`` into rows of the file at ``path``."""

    path: str
    shape: tuple[int, int, int, int]
    start: int
    files: tuple[str, ...] = ()
    arrays: np.ndarray | None = None


def _build(
    split: Split,
    size: int,
    data_path: Path,
    sidecar_path: Path,
    inputs: dict[str, Any],
    workers: int,
    skip_bad: bool,
    progress: bool,
    label: str,
) -> dict[str, Any]:
    """Decode the split into a temporary file, drop its bad rows (``skip_bad``), rename it into
    place and write the sidecar; returns the sidecar. Nothing is left behind on failure."""
    _remove_stale_temporaries(data_path)
    n = len(split)
    shape = (n, 3, size, size)
    row_bytes = 3 * size * size
    tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    arrays = _checked_arrays(split.arrays, label) if split.arrays is not None else None
    try:
        with open(tmp, "wb") as f:
            f.truncate(n * row_bytes)
        chunks = [
            _Chunk(
                path=str(tmp),
                shape=shape,
                start=start,
                files=tuple(str(p) for p in split.files[start : start + CHUNK]) if arrays is None else (),
                arrays=arrays[start : start + CHUNK] if arrays is not None else None,
            )
            for start in range(0, n, CHUNK)
        ]
        bad = sorted(_run_chunks(chunks, workers, progress, label, n))
        if bad and not skip_bad:
            raise DataError(
                f"{_bad_message(label, n, _bad_entries(split, bad))}; "
                "set scenario.skip_bad_images = true to drop them"
            )
        kept = np.setdiff1d(np.arange(n, dtype=np.int64), np.array([i for i, _ in bad], np.int64))
        if bad:
            _compact(tmp, shape, kept)
            os.truncate(tmp, len(kept) * row_bytes)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar = {
        "format": "cl-bench-image-cache",
        "version": FORMAT_VERSION,
        "label": label,
        "count": len(kept),
        "size": size,
        "layout": "raw uint8 [count, 3, size, size], C order",
        "inputs": inputs,
        "bad": _bad_entries(split, bad),
    }
    _write_atomic(sidecar_path, json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def _run_chunks(
    chunks: Sequence[_Chunk], workers: int, progress: bool, label: str, total: int
) -> Iterator[tuple[int, str]]:
    """Decode every chunk (in worker processes unless one worker suffices); yields the
    (index, error) of each undecodable sample while a progress bar counts the images."""
    n_workers = min(workers or usable_cpus(), len(chunks))
    phase = progress_.Phase(progress_.choose(progress), total=total, desc=f"caching {label}", unit="image")
    try:
        if n_workers <= 1:
            for chunk in chunks:
                yield from _decode_chunk(chunk)
                phase.update(_chunk_len(chunk))
            return
        # fork: the workers need only PIL and numpy, and start in milliseconds
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
            futures = {pool.submit(_decode_chunk, chunk): chunk for chunk in chunks}
            try:
                for future in as_completed(futures):
                    yield from future.result()
                    phase.update(_chunk_len(futures[future]))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        phase.close()


def _decode_chunk(chunk: _Chunk) -> list[tuple[int, str]]:
    """Worker: decode a chunk's samples into their rows of the memory-mapped file; returns the
    (index, error) of those that cannot be decoded (their rows stay zero)."""
    out = np.memmap(chunk.path, dtype=np.uint8, mode="r+", shape=chunk.shape)
    size = chunk.shape[-1]
    bad: list[tuple[int, str]] = []
    for offset in range(_chunk_len(chunk)):
        index = chunk.start + offset
        try:
            if chunk.arrays is not None:
                out[index] = eval_transform(Image.fromarray(chunk.arrays[offset]), size)
            else:
                out[index] = decode_file(chunk.files[offset], size)
        except Exception as e:  # any decoder failure marks the file bad; the build reports it
            bad.append((index, f"{type(e).__name__}: {e}"))
    out.flush()
    del out
    return bad


def _chunk_len(chunk: _Chunk) -> int:
    return len(chunk.arrays) if chunk.arrays is not None else len(chunk.files)


def _compact(path: Path, shape: tuple[int, int, int, int], kept: np.ndarray) -> None:
    """Move the kept rows to the front of the file, in order (in place: a row only moves down)."""
    rows = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    for new, old in enumerate(kept.tolist()):
        if new != old:
            rows[new] = rows[old]
    rows.flush()
    del rows


def _bad_entries(split: Split, bad: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    where = (lambda i: str(Path(split.files[i]).absolute())) if split.arrays is None else (lambda i: f"[{i}]")
    return [{"index": i, "path": where(i), "error": error} for i, error in bad]


def _bad_message(label: str, n: int, bad: Sequence[dict[str, Any]]) -> str:
    shown = ", ".join(b["path"] for b in bad[:SHOWN_BAD])
    more = f" and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
    return (
        f"{label}: {len(bad)} of {n} images cannot be decoded: {shown}{more} (first error: {bad[0]['error']})"
    )


@contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """PIL's ``LOAD_TRUNCATED_IMAGES`` off while decoding, whatever another library set it to:
    a truncated file must fail, not be padded with grey."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all of them off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")


def _remove_stale_temporaries(data_path: Path) -> None:
    """Delete the temporary files of builds of this cache whose process is gone (killed)."""
    for path in data_path.parent.glob(f"{data_path.name}.tmp-*"):
        match = TEMPORARY.search(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            continue


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
