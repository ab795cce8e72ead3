"""An X-TAIL-shaped run on a generated full-size fixture: does the data path keep the GPU fed?

``python -m benchmarks.multidomain`` writes 10 domains with X-TAIL's class counts and test-set
sizes (MULTIDOMAIN.md §3.12: 89,913 test images; 16 shots per class: 17,600 training images)
as JPEG photos of realistic size (500x375, some greyscale and 1024x768) in CoOp's split-file
layout, then times, in one process:

1. the image cache build (every core) and a second start-up (cache hit);
2. ``cl-bench bench``'s own lora step and eval forward on the same backbone (the references);
3. ``cl-bench run --strategy lora --scenario x-tail`` on the fixture (``--steps`` per domain,
   every row scored over all 89,913 test images), reporting training samples/s and evaluation
   images/s as ratios of (2), wall time per experience, peak GPU memory and peak host RSS.

The domains are registered for this process only, under the names ``Bench<Domain>``: the images
are smooth noise (so JPEG sizes and decode costs are those of photos), not the real datasets.
The prompts use each real domain's X-TAIL template, and the longest class names are as long in
tokens as the real ones (:func:`class_name`): the text tower's cost follows the longest prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# (domain, classes, test images) of X-TAIL (MULTIDOMAIN.md §3.12)
XTAIL_SHAPE = (
    ("Aircraft", 100, 3333),
    ("Caltech101", 100, 2465),
    ("DTD", 47, 1692),
    ("EuroSAT", 10, 8100),
    ("Flowers102", 102, 2463),
    ("Food101", 101, 30300),
    ("MNIST", 10, 10000),
    ("OxfordPet", 37, 3669),
    ("StanfordCars", 196, 8041),
    ("SUN397", 397, 19850),
)
SHOTS = 16


def _photo(rng: np.random.Generator, index: int) -> tuple[np.ndarray, str]:
    """A smooth random image (low-frequency noise upsampled): compresses and decodes like a photo."""
    width, height = (1024, 768) if index % 20 == 0 else (500, 375)
    coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((25, 25, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-8, 9, size=image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8), "L" if index % 10 == 0 else "RGB"


def _write_chunk(args: tuple[str, list[tuple[int, str]], int]) -> None:
    from PIL import Image

    folder, items, seed = args
    rng = np.random.default_rng(seed)
    for index, rel in items:
        pixels, mode = _photo(rng, index)
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert(mode).save(path, quality=90)


def class_name(domain: str, label: int) -> str:
    """A class name as long as the real ones in tokens, where that matters: the text tower's cost
    follows the longest prompt (tokens are cut after it), which in X-TAIL is a car model's
    ("Chevrolet Silverado 1500 Hybrid Crew Cab 2012": 20 tokens with its template)."""
    if domain == "StanfordCars":
        return f"{2000 + label % 13} model {label} extended crew cab hybrid convertible"
    return f"class {label}"


def write_full_fixture(root: Path, scale: float, workers: int, shots: int = SHOTS) -> dict[str, int]:
    """Every domain under ``root/<domain>/`` (images/ and split.json); returns image counts."""
    counts = {}
    jobs = []
    for d, (domain, classes, n_test) in enumerate(XTAIL_SHAPE):
        n_test = max(classes, int(n_test * scale))
        folder = root / domain
        items: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
        for split, n in (("train", classes * shots), ("test", n_test)):
            for i in range(n):
                label = i % classes
                items[split].append([f"c{label:03d}/{split}_{i:05d}.jpg", label, class_name(domain, label)])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "split.json").write_text(json.dumps(items))
        flat = [(i, it[0]) for split in ("train", "test") for i, it in enumerate(items[split])]
        for k in range(0, len(flat), 500):
            jobs.append((str(folder / "images"), flat[k : k + 500], d * 100_000 + k))
        counts[domain] = len(flat)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, jobs))
    return counts


def real_template(domain: str) -> str:
    """The X-TAIL template of the real domain (its prompts' length), ``a photo of a {}.`` if none."""
    import scenarios.domains.all  # noqa: F401  (registers the real domains)
    from scenarios.domains import base

    spec = base.DOMAINS.get(domain)
    return spec.xtail_template if spec is not None and spec.xtail_template else "a photo of a {}."


def register_domains() -> list[str]:
    """``Bench<Domain>`` domains reading ``<root>/<Domain>/split.json`` (CoOp format)."""
    from scenarios.domains import base
    from scenarios.domains.base import DomainData, DomainSpec, ReadOptions, Sizes, Split
    from scenarios.domains.files import read_coop_split

    names = []
    for domain, classes, n_test in XTAIL_SHAPE:

        def read(root: Path, benchmark: Any, options: ReadOptions, domain: str = domain) -> DomainData:
            del options
            folder = root / domain
            split = read_coop_split(folder / "split.json", folder / "images", domain)
            return DomainData(
                domain="Bench" + domain,
                benchmark=benchmark,
                layout="generated (CoOp json)",
                folder=folder,
                class_names=split.class_names,
                train=Split(split.labels["train"], files=split.files["train"]),
                test=Split(split.labels["test"], files=split.files["test"]),
            )

        name = "Bench" + domain
        if name not in base.DOMAINS:
            base.register(
                DomainSpec(
                    name=name,
                    aliases=(),
                    benchmarks=("x-tail",),
                    layouts=("generated",),
                    xtail_template=real_template(domain),
                    mtil_train_template="",
                    mtil_eval_templates=(),
                    sizes={"x-tail": Sizes(classes * SHOTS, n_test)},
                    read=read,
                    write_fixture=lambda root, layout, rng: None,
                )
            )
        names.append(name)
    return names


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of X-TAIL's test-set sizes")
    parser.add_argument("--steps", type=int, default=50, help="training steps per domain")
    parser.add_argument("--shots", type=int, default=SHOTS, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--backbone", default="clip-vit-b-16")
    parser.add_argument("--workdir", type=Path, help="keep the fixture and cache here (default: a temp dir)")
    parser.add_argument("--skip-reference", action="store_true", help="no bench lora step (CPU smoke run)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from cl_bench.cli import load_components

    load_components()
    import torch

    from cl_bench import config, loop
    from scenarios.multidomain import XTail

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cl-bench-xtail-"))
    workers = os.cpu_count() or 1
    tic = time.perf_counter()
    counts = write_full_fixture(workdir / "data", args.scale, workers, args.shots)
    written = time.perf_counter() - tic
    n_images = sum(counts.values())
    print(f"fixture: {n_images:,} JPEGs written in {written:.1f} s ({workers} processes)", flush=True)
    domains = register_domains()
    scenario_args = {
        "root": str(workdir / "data"),
        "domains": domains,
        "cache_dir": str(workdir / "cache"),
        "image_size": 224,
        "shots": args.shots,
    }
    scenario_cfg = config.build(XTail, scenario_args, "x-tail")
    tic = time.perf_counter()
    scenario_cfg.build(0)
    build_s = time.perf_counter() - tic
    tic = time.perf_counter()
    scenario_cfg.build(0)
    hit_s = time.perf_counter() - tic
    print(f"cache: built in {build_s:.1f} s ({n_images / build_s:,.0f} images/s), reopened in {hit_s:.2f} s")

    reference: dict[str, float] = {}
    if not args.skip_reference:
        from benchmarks import speed

        s = speed.Setting(backbone=args.backbone, batch=args.batch_size, eval_batch=args.eval_batch_size)
        rows = speed.measure(speed.build("lora", s), s, modes=("graphs",))
        row = next(iter(rows.values()))
        reference = {"train": row.train_samples_per_s or 0.0, "eval": row.eval_samples_per_s or 0.0}
        print(f"bench lora: train {reference['train']:,.0f}/s, eval {reference['eval']:,.0f}/s", flush=True)
        del rows
        torch.cuda.empty_cache()

    cfg = config.resolve(
        [
            {
                "strategy": "lora",
                "scenario": {"name": "x-tail", **scenario_args},
                "backbone": args.backbone,
                "device": args.device,
                "steps_per_experience": args.steps,
                "batch_size": args.batch_size,
                "eval_batch_size": args.eval_batch_size,
                "out": str(workdir / "runs"),
                "run_id": "xtail-bench",
                "overwrite": True,
                "log_every": 10,
            }
        ]
    )
    tic = time.perf_counter()
    record = loop.run(cfg, progress=False)
    wall = time.perf_counter() - tic
    exps = record.experiences
    train_rate = statistics.median(e.train_samples_per_s for e in exps[1:] or exps)
    eval_rate = statistics.median(e.eval_samples_per_s for e in exps)
    n_test = sum(record.accuracy["n_test"])

    def ratio(value: float, key: str) -> str:
        return f"{value / reference[key]:.2f}x" if reference.get(key) else "-"

    print()
    print(
        f"X-TAIL-shaped run ({args.backbone}, {args.device}, batch {args.batch_size}, "
        f"{args.steps} steps/domain)"
    )
    print(f"{'figure':<40} {'value':>14} {'vs bench lora':>14}")
    print(f"{'images (train+test, JPEG)':<40} {n_images:>14,}")
    print(f"{'cache build images/s':<40} {n_images / build_s:>14,.0f}")
    print(f"{'second start-up (cache hit) s':<40} {hit_s:>14.2f}")
    print(f"{'train samples/s (median, exp 2..)':<40} {train_rate:>14,.0f} {ratio(train_rate, 'train'):>14}")
    print(f"{'eval images/s (median row)':<40} {eval_rate:>14,.0f} {ratio(eval_rate, 'eval'):>14}")
    print(f"{'test images per row':<40} {n_test:>14,}")
    per_exp = [e.train_time_s + e.eval_time_s for e in exps]
    print(f"{'wall per experience s (median)':<40} {statistics.median(per_exp):>14.1f}")
    print(f"{'run wall s':<40} {wall:>14.1f}")
    peak = max(e.peak_memory_train_bytes for e in exps) if args.device == "cuda" else None
    if peak:
        print(f"{'peak GPU memory GiB (train)':<40} {peak / 2**30:>14.2f}")
    print(f"{'peak host RSS GiB':<40} {_rss_gib():>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
