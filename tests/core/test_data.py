from __future__ import annotations

import torch

from cl_bench.data import ExperienceData, Preprocess
from cl_bench.scenario import ImageSource


def data(n: int = 10) -> ExperienceData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    source = ImageSource(images, torch.arange(n) % 3)
    return ExperienceData.gather(source, torch.arange(n), torch.device("cpu"))


def test_each_epoch_visits_every_sample_once_and_steps_cycle() -> None:
    d = data(10)
    g = torch.Generator().manual_seed(0)
    batches = list(d.batches(4, shuffle=True, generator=g, n_steps=6))  # 3 batches per epoch, 2 epochs
    assert [len(y) for _, y in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        ids = torch.cat([x[:, 0, 0, 0] for x, _ in epoch]).long()
        assert sorted(ids.tolist()) == list(range(10))
    for x, y in batches:
        assert torch.equal(y, x[:, 0, 0, 0].long() % 3)  # targets stay aligned with images


def test_shuffling_is_deterministic_for_a_seeded_generator() -> None:
    d = data(10)
    first = [x for x, _ in d.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    again = [x for x, _ in d.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    ordered = torch.cat([x for x, _ in d.batches(4, shuffle=False)])[:, 0, 0, 0]
    assert ordered.tolist() == list(range(10))


def test_preprocess_eval_resizes_and_normalizes() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pre = Preprocess(16, mean, std, torch.device("cpu"))
    out = pre(images, train=False)
    expected = torch.nn.functional.interpolate(
        images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False
    )
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_flip_augmentation_yields_the_image_or_its_mirror() -> None:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    plain = Preprocess(8, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    flip = Preprocess(8, (0, 0, 0), (1, 1, 1), torch.device("cpu"), augmentations=("flip",))
    reference = plain(images, train=False)
    out = flip(images, train=True, generator=torch.Generator().manual_seed(0))
    same = (out - reference).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - reference.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # about half are flipped


def test_crop_augmentation_translates_within_the_padding() -> None:
    images = torch.zeros(32, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 12:20, 12:20] = 255  # a centred square
    crop = Preprocess(32, (0, 0, 0), (1, 1, 1), torch.device("cpu"), augmentations=("crop",))
    out = crop(images, train=True, generator=torch.Generator().manual_seed(0))
    mass = out[:, 0]
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = (mass * ys).sum((1, 2)) / mass.sum((1, 2))
    cx = (mass * xs).sum((1, 2)) / mass.sum((1, 2))
    shift = torch.stack([cy - 15.5, cx - 15.5])
    assert float(shift.abs().max()) <= 4.0 + 1e-3
    assert float(shift.abs().max()) > 0.5  # it does move
    assert torch.allclose(mass.sum((1, 2)), torch.full((32,), 64.0), atol=1e-2)  # nothing cropped away
