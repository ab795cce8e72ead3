"""Image decoding speed: which JPEG decoder the image cache should use, and what a build costs.

Writes ``--n`` photo-like JPEGs (mostly 500x375 like most of the X-TAIL/MTIL folders, some
1024x768 and some greyscale) to a temporary folder, then prints images/s on one core for each
available decoder, decode alone and decode + CLIP's eval transform (PIL bicubic resize and
centre crop, :func:`cl_bench.image_cache.eval_transform`), and whether its pixels equal PIL's
(the cache is exact only if they do). Then the cache build through
:func:`cl_bench.image_cache.cached_images` with every core, and the start-up of a second run
(a cache hit). GPU decoding (``--device cuda``, batched ``torchvision.io.decode_jpeg``) is
decode only: a resize on the GPU would not be PIL's bicubic.

    python -m benchmarks.decode
    python -m benchmarks.decode --device cuda --n 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cl_bench.image_cache import cached_images, eval_transform, usable_cpus
from scenarios.domains.base import Split

SIZE = 224


def photo_like(w: int, h: int, grey: bool, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields, edges and mild noise: JPEG sizes and decode costs like photographs
    (pure noise would be several times larger and slower to decode)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        field = np.zeros((h, w), np.float32)
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 6) / w, rng.uniform(0.5, 6) / h, rng.uniform(0, 6.3)
            field += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(field)
    image = np.stack(channels, axis=-1) * 40 + 128
    for _ in range(6):  # a few hard-edged blocks
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        image[y0 : y0 + rng.integers(10, h // 3), x0 : x0 + rng.integers(10, w // 3)] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return pil.convert("L") if grey else pil


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` JPEGs (quality 90): 1 in 5 of 1024x768, 1 in 10 greyscale, the rest 500x375."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = (1024, 768) if i % 5 == 4 else (500, 375)
        if i % 2:
            w, h = h, w  # portrait as often as landscape
        path = folder / f"{i:05d}.jpg"
        photo_like(w, h, grey=i % 10 == 3, rng=rng).save(path, quality=90)
        paths.append(path)
    return paths


def pil_decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def decoders() -> dict[str, Callable[[Path], Image.Image]]:
    """Each available decoder as path -> RGB PIL image (what the transform takes)."""
    out: dict[str, Callable[[Path], Image.Image]] = {"PIL": pil_decode}
    if importlib.util.find_spec("simplejpeg") is not None:
        import simplejpeg

        out["simplejpeg"] = lambda p: Image.fromarray(
            simplejpeg.decode_jpeg(p.read_bytes(), colorspace="RGB", fastdct=False, fastupsample=False)
        )
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    out["torchvision.io (cpu)"] = lambda p: Image.fromarray(
        decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    )
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f}"


def best_seconds(work: Callable[[], object], repeats: int = 2) -> float:
    """The fastest of ``repeats`` timed runs of ``work`` (after one untimed warm-up run: the
    first pass pays for page cache misses and lazy imports)."""
    work()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        work()
        times.append(time.perf_counter() - tic)
    return min(times)


def measure_decoder(
    name: str, decode: Callable[[Path], Image.Image], paths: list[Path], reference: list[np.ndarray]
) -> tuple[str, str, str, str]:
    """(name, decode images/s, decode+transform images/s, images whose pixels equal PIL's)."""
    decode_s = best_seconds(lambda: [decode(p) for p in paths])
    full_s = best_seconds(lambda: [eval_transform(decode(p), SIZE) for p in paths])
    same = sum(np.array_equal(np.asarray(decode(p)), r) for p, r in zip(paths, reference, strict=True))
    return name, rate(len(paths), decode_s), rate(len(paths), full_s), f"{same}/{len(paths)}"


def measure_gpu(paths: list[Path], reference: list[np.ndarray], batch: int = 64) -> tuple[str, str, str, str]:
    """Batched nvJPEG decoding on the GPU (decode only: the bicubic resize must be PIL's)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    datas = [read_file(str(p)) for p in paths]
    decode_jpeg(datas[:batch], device="cuda", mode=ImageReadMode.RGB)  # warm-up: nvJPEG handles
    torch.cuda.synchronize()
    tic = time.perf_counter()
    decoded: list[torch.Tensor] = []
    for k in range(0, len(datas), batch):
        decoded += decode_jpeg(datas[k : k + batch], device="cuda", mode=ImageReadMode.RGB)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    same = sum(
        np.array_equal(d.permute(1, 2, 0).cpu().numpy(), r) for d, r in zip(decoded, reference, strict=True)
    )
    return "torchvision.io (cuda, batched)", rate(len(paths), seconds), "   (n/a)", f"{same}/{len(paths)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="JPEGs to generate (default 400)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="also decode on the GPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cl-bench-decode-") as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, args.n)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.n} JPEGs, {megabytes:.1f} MiB ({megabytes * 1024 / args.n:.0f} KiB each), size {SIZE}")
        reference = [np.asarray(pil_decode(p)) for p in paths]
        rows = [measure_decoder(name, fn, paths, reference) for name, fn in decoders().items()]
        if args.device == "cuda":
            rows.append(measure_gpu(paths, reference))
        print()
        print(f"{'decoder (1 core)':32} {'decode/s':>9} {'+transform/s':>13} {'pixels = PIL':>13}")
        for name, decode_rate, full_rate, same in rows:
            print(f"{name:32} {decode_rate:>9} {full_rate:>13} {same:>13}")
        split = Split(np.zeros(len(paths), np.int64), files=tuple(paths))
        cache = folder / "cache"
        build = cached_images(split, SIZE, cache, progress=False)
        hit = cached_images(split, SIZE, cache, progress=False)
        assert hit.hit
        print()
        cpus = usable_cpus()
        built = rate(args.n, build.seconds).strip()
        print(f"cache build, {cpus} cores: {built} images/s ({build.seconds:.2f} s)")
        print(f"second run (cache hit): {hit.seconds * 1000:.1f} ms to open {hit.images.shape[0]} images")


if __name__ == "__main__":
    main()
