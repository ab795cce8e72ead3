"""The image cache: CLIP's eval transform bit for bit, cache hits and invalidation, bad files."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

from cl_bench import image_cache
from cl_bench.errors import DataError
from cl_bench.image_cache import cached_images, decode_file, eval_transform
from scenarios.domains.base import Split

SIZE = 16


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference(image: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, as uint8 [3, s, s]."""
    out = Compose([Resize(size, InterpolationMode.BICUBIC), CenterCrop(size)])(image)
    return np.asarray(out).transpose(2, 0, 1)


def write_images(folder: Path, n: int) -> list[Path]:
    """``n`` small JPEGs and PNGs of varied sizes (landscape, portrait, square)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        noise(20 + 3 * (i % 4), 24 - 2 * (i % 5), seed=i).save(path)
        paths.append(path)
    return paths


def files_split(paths: list[Path]) -> Split:
    return Split(np.arange(len(paths), dtype=np.int64) % 3, files=tuple(paths))


def build(split: Split, cache: Path, **kw: object) -> image_cache.CachedImages:
    return cached_images(split, SIZE, cache, workers=2, progress=False, label="toy test", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("w", "h"),
    [
        (500, 375),
        (375, 500),
        (224, 224),
        (225, 224),
        (224, 401),
        (1024, 768),
        (97, 1003),
        (300, 301),
        (17, 13),
    ],
)
@pytest.mark.parametrize("size", [224, 31])
def test_eval_transform_is_torchvision_bicubic_resize_and_centre_crop(w: int, h: int, size: int) -> None:
    image = noise(w, h, seed=w * h)
    out = eval_transform(image, size)
    assert out.dtype == np.uint8
    assert out.shape == (3, size, size)
    assert np.array_equal(out, reference(image, size))


@pytest.mark.parametrize(
    ("mode", "color", "rgb"),
    [
        ("L", 77, (77, 77, 77)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha is dropped, not composited on white
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_every_mode_ends_as_rgb(mode: str, color: object, rgb: tuple[int, int, int]) -> None:
    out = eval_transform(Image.new(mode, (40, 30), color), SIZE)  # type: ignore[arg-type]
    assert out.shape == (3, SIZE, SIZE)
    assert out[:, 0, 0].tolist() == list(rgb)
    assert bool((out == np.array(rgb, dtype=np.uint8).reshape(3, 1, 1)).all())


def test_palette_and_greyscale_images_match_the_reference_on_their_rgb_conversion() -> None:
    palette = noise(33, 21, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey = noise(21, 33, seed=5).convert("L")
    for image in (palette, grey):
        assert np.array_equal(eval_transform(image, SIZE), reference(image.convert("RGB"), SIZE))
    flat = Image.new("P", (20, 20), 1)
    flat.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert eval_transform(flat, SIZE)[:, 5, 5].tolist() == [200, 100, 50]


def test_files_are_cached_then_opened_from_the_cache(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 9)
    split = files_split(paths)
    first = build(split, tmp_path / "cache")
    assert not first.hit
    assert first.images.shape == (9, 3, SIZE, SIZE)
    assert first.kept.tolist() == list(range(9))
    for i, path in enumerate(paths):
        assert np.array_equal(first.images[i].numpy(), reference(Image.open(path).convert("RGB"), SIZE))
    second = build(split, tmp_path / "cache")
    assert second.hit
    assert second.seconds < 1.0
    assert second.path == first.path
    assert torch.equal(second.images, first.images)
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["count"] == 9
    assert sidecar["size"] == SIZE
    assert sidecar["bad"] == []
    assert sidecar["inputs"]["source"] == "files"
    assert sidecar["inputs"]["count"] == 9
    assert sidecar["inputs"]["first"] == str(paths[0].absolute())
    assert sidecar["inputs"]["bytes"] == sum(p.stat().st_size for p in paths)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [first.path.name, first.path.with_suffix(".json").name, first.path.with_suffix(".lock").name]
    )  # no temporary file left


def test_one_worker_and_two_workers_write_the_same_bytes(tmp_path: Path) -> None:
    split = files_split(write_images(tmp_path / "images", 70))  # two chunks of 64 and 6
    two = build(split, tmp_path / "two")
    one = cached_images(split, SIZE, tmp_path / "one", workers=1, progress=False)
    assert one.path.name == two.path.name  # the key does not depend on how it was built
    assert one.path.read_bytes() == two.path.read_bytes()


def test_a_changed_file_or_file_list_rebuilds(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 4)
    cache = tmp_path / "cache"
    first = build(files_split(paths), cache)
    noise(40, 40, seed=99).save(paths[1])  # new bytes (and size)
    changed = build(files_split(paths), cache)
    assert not changed.hit
    assert changed.path != first.path
    assert np.array_equal(changed.images[1].numpy(), decode_file(paths[1], SIZE))  # the new picture
    assert not torch.equal(changed.images[1], first.images[1])
    assert torch.equal(changed.images[0], first.images[0])
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # only the mtime moves
    touched = build(files_split(paths), cache)
    assert not touched.hit
    assert touched.path not in (first.path, changed.path)
    fewer = build(files_split(paths[:3]), cache)
    assert not fewer.hit
    assert fewer.images.shape[0] == 3
    assert build(files_split(paths), cache).hit


def bad_files(folder: Path) -> tuple[Path, Path]:
    """A corrupt file named .jpg and a JPEG cut before its end."""
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    buffer = io.BytesIO()
    noise(60, 40, seed=7).save(buffer, "JPEG", quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) - 40])
    return corrupt, truncated


def test_a_corrupt_and_a_truncated_jpeg_fail_the_build_with_both_paths(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 5)
    corrupt, truncated = bad_files(tmp_path / "images")
    split = files_split([paths[0], corrupt, paths[1], paths[2], truncated, paths[3]])
    with pytest.raises(DataError) as error:
        build(split, tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"toy test: 2 of 6 images cannot be decoded: {corrupt}, {truncated} (first error: "
    )
    assert "skip_bad_images" in message
    assert list((tmp_path / "cache").glob("*.uint8*")) == []  # nothing cached, no temporary left
    assert list((tmp_path / "cache").glob("*.json")) == []
    with pytest.raises(OSError, match="truncated"):
        decode_file(truncated, SIZE)


def test_skip_bad_drops_them_and_says_which(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_images(tmp_path / "images", 5)
    corrupt, truncated = bad_files(tmp_path / "images")
    split = files_split([paths[0], corrupt, paths[1], paths[2], truncated, paths[3]])
    with caplog.at_level(logging.WARNING, logger="cl_bench.image_cache"):
        cached = build(split, tmp_path / "cache", skip_bad=True)
    assert cached.kept.tolist() == [0, 2, 3, 5]
    assert cached.images.shape == (4, 3, SIZE, SIZE)
    for row, path in zip(range(4), [paths[0], paths[1], paths[2], paths[3]], strict=True):
        assert np.array_equal(cached.images[row].numpy(), decode_file(path, SIZE))
    assert f"{corrupt}, {truncated}" in caplog.text
    sidecar = json.loads(cached.path.with_suffix(".json").read_text())
    assert sidecar["count"] == 4
    assert [(b["index"], b["path"]) for b in sidecar["bad"]] == [(1, str(corrupt)), (4, str(truncated))]
    again = build(split, tmp_path / "cache", skip_bad=True)
    assert again.hit
    assert again.kept.tolist() == [0, 2, 3, 5]
    with pytest.raises(DataError, match="2 of 6 images cannot be decoded"):
        build(split, tmp_path / "cache")  # the cache remembers them: still an error without skip_bad


def test_the_error_names_five_bad_files_and_counts_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    bad = []
    for i in range(7):
        bad.append(folder / f"bad{i}.png")
        bad[-1].write_bytes(b"nothing")
    with pytest.raises(DataError) as error:
        build(files_split(bad), tmp_path / "cache")
    assert f"7 of 7 images cannot be decoded: {', '.join(map(str, bad[:5]))} and 2 more (" in str(error.value)


def test_a_missing_file_is_a_data_error_with_its_path(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 2)
    gone = tmp_path / "images" / "gone.jpg"
    with pytest.raises(DataError, match=f"toy test: cannot read image file {gone} "):
        build(files_split([*paths, gone]), tmp_path / "cache")


def test_array_splits_go_through_the_same_transform(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    digits[0] = 200
    cifar = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    grey = build(Split(np.arange(5), arrays=digits), tmp_path / "cache")
    rgb = build(Split(np.arange(4), arrays=cifar), tmp_path / "cache")
    assert grey.images.shape == (5, 3, SIZE, SIZE)
    assert rgb.images.shape == (4, 3, SIZE, SIZE)
    assert bool((grey.images[0] == 200).all())
    for i in range(5):
        assert np.array_equal(
            grey.images[i].numpy(), reference(Image.fromarray(digits[i]).convert("RGB"), SIZE)
        )
    for i in range(4):
        assert np.array_equal(rgb.images[i].numpy(), reference(Image.fromarray(cifar[i]), SIZE))
    assert build(Split(np.arange(4), arrays=cifar.copy()), tmp_path / "cache").hit
    cifar[2, 0, 0, 0] ^= 1
    assert not build(Split(np.arange(4), arrays=cifar), tmp_path / "cache").hit
    with pytest.raises(
        DataError, match=r"toy test: image arrays must be uint8 \[N, H, W\] or \[N, H, W, 3\]"
    ):
        build(Split(np.arange(2), arrays=np.zeros((2, 8, 8), np.float32)), tmp_path / "cache")


def test_images_are_a_writable_memory_map_of_the_cache_file(tmp_path: Path) -> None:
    split = files_split(write_images(tmp_path / "images", 3))
    build(split, tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        cached = build(split, tmp_path / "cache")
    address = cached.images.data_ptr()
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if len(fields) == 6 and start <= address < end:
            mappings.append(fields[5])
    assert mappings == [str(cached.path)]  # the tensor's memory is the file, not a copy in RAM
    before = cached.path.read_bytes()
    cached.images[0] = 0  # a private mapping: writes stay in this process
    assert cached.path.read_bytes() == before


def test_an_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path / "images", 6)
    decode = image_cache.decode_file
    calls = []

    def killed_at_the_fourth(path: str | Path, size: int) -> np.ndarray:
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return decode(path, size)

    monkeypatch.setattr(image_cache, "decode_file", killed_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        cached_images(files_split(paths), SIZE, tmp_path / "cache", workers=1, progress=False)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]
    monkeypatch.setattr(image_cache, "decode_file", decode)
    assert not build(files_split(paths), tmp_path / "cache").hit


def test_temporaries_of_dead_builds_are_removed(tmp_path: Path) -> None:
    split = files_split(write_images(tmp_path / "images", 2))
    first = build(split, tmp_path / "cache")
    first.path.unlink()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = first.path.with_name(f"{first.path.name}.tmp-{int(dead.stdout)}-0a1b2c3d")
    stale.write_bytes(b"half a build")
    alive = first.path.with_name(f"{first.path.name}.tmp-{os.getpid()}-0a1b2c3d")
    alive.write_bytes(b"someone building")
    assert not build(split, tmp_path / "cache").hit
    assert not stale.exists()
    assert alive.exists()
