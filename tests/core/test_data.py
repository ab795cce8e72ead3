from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cl_bench.config import RunConfig
from cl_bench.data import BatchCursor, ExperienceData, Preprocess, StreamedRows
from cl_bench.errors import ConfigError
from cl_bench.scenario import ImageSource, ShardedImages


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


# -- streamed experiences (images over the host memory budget stay in their memory-mapped source)


class RecordingImages(ShardedImages):
    """A source that records which rows each read asked for."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__([images[:7], images[7:]])
        self.reads: list[list[int]] = []

    def __getitem__(self, ids: torch.Tensor | int) -> torch.Tensor:
        self.reads.append(torch.as_tensor(ids).tolist())
        return super().__getitem__(ids)


def source(n: int = 23) -> ImageSource:
    """Sample i's pixels are i + (channel, row, column) pattern, so any mix-up shows."""
    pattern = torch.arange(3 * 2 * 2, dtype=torch.uint8).view(1, 3, 2, 2)
    images = (torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) * 10 + pattern).contiguous()
    return ImageSource(RecordingImages(images), torch.arange(n) % 5)


EXPERIENCE = torch.tensor([3, 17, 0, 9, 22, 5, 11, 14, 2, 8, 20, 6, 1])  # 13 samples of both shards
BUDGET = 13 * 3 * 2 * 2  # exactly the experience's bytes: resident; one byte less: streamed


def both(src: ImageSource) -> tuple[ExperienceData, ExperienceData]:
    cpu = torch.device("cpu")
    resident = ExperienceData.gather(src, EXPERIENCE, cpu, budget_bytes=BUDGET)
    streamed = ExperienceData.gather(src, EXPERIENCE, cpu, budget_bytes=BUDGET - 1)
    return resident, streamed


def assert_same(
    a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def test_gather_streams_only_over_the_budget() -> None:
    resident, streamed = both(source())
    assert not resident.streamed
    assert isinstance(resident.images, torch.Tensor)
    assert streamed.streamed
    assert isinstance(streamed.images, StreamedRows)
    assert streamed.images.shape == (13, 3, 2, 2)
    assert torch.equal(streamed.targets, EXPERIENCE % 5)
    unlimited = ExperienceData.gather(source(), EXPERIENCE, torch.device("cpu"))
    assert not unlimited.streamed


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n_steps", [None, 2, 11])  # within one epoch, and cycling through 3+ epochs
def test_streamed_batches_equal_resident_batches(shuffle: bool, n_steps: int | None) -> None:
    resident, streamed = both(source())
    g_resident, g_streamed = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = list(resident.batches(4, shuffle=shuffle, generator=g_resident, n_steps=n_steps))
    b = list(streamed.batches(4, shuffle=shuffle, generator=g_streamed, n_steps=n_steps))
    assert_same(a, b)
    assert len(b) == (n_steps or 4)
    assert torch.equal(g_resident.get_state(), g_streamed.get_state())  # the same draws, no extra one
    epoch = torch.cat([x[:, 0, 0, 0] for x, _ in b[:4]]).tolist() if len(b) >= 4 else []
    if n_steps is None and not shuffle:
        assert epoch == [v * 10 for v in EXPERIENCE.tolist()]
    elif n_steps is None:
        assert sorted(epoch) == sorted(v * 10 for v in EXPERIENCE.tolist())
        assert epoch != [v * 10 for v in EXPERIENCE.tolist()]


def test_streamed_reads_each_batch_once_and_never_beyond_the_last() -> None:
    src = source()
    streamed = ExperienceData.gather(src, EXPERIENCE, torch.device("cpu"), budget_bytes=0)
    images = src.images
    assert isinstance(images, RecordingImages)
    out = list(streamed.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1), n_steps=6))
    reads = [[int(EXPERIENCE.tolist().index(i)) for i in ids] for ids in images.reads]
    yielded = [[EXPERIENCE.tolist().index(int(v) // 10) for v in x[:, 0, 0, 0]] for x, _ in out]
    assert reads == yielded  # 6 reads, in order: prefetched batches are used, none is read twice


@pytest.mark.parametrize("stop_after", [1, 3, 4, 6])  # mid-epoch, an epoch's last batch, a new epoch
def test_streamed_stream_resumes_from_a_restored_cursor_like_resident(stop_after: int) -> None:
    resident, streamed = both(source())
    runs = []
    for data in (resident, streamed):
        g = torch.Generator().manual_seed(9)
        cursor = BatchCursor(data.images.device)
        stream = data.batches(4, shuffle=True, generator=g, n_steps=10, cursor=cursor)
        head = [next(stream) for _ in range(stop_after)]
        stream.close()  # the run was killed here; the checkpoint holds the cursor and generator
        saved = BatchCursor(
            data.images.device,
            order=None if cursor.order is None else cursor.order.clone(),
            start=cursor.start,
            done=cursor.done,
        )
        state = g.get_state()
        g_restored = torch.Generator()
        g_restored.set_state(state)
        tail = list(data.batches(4, shuffle=True, generator=g_restored, n_steps=10, cursor=saved))
        assert len(head) + len(tail) == 10
        runs.append(head + tail)
    assert_same(runs[0], runs[1])


def test_streamed_reads_two_batches_ahead_within_the_epoch() -> None:
    src = source()
    images = src.images
    assert isinstance(images, RecordingImages)
    streamed = ExperienceData.gather(src, EXPERIENCE, torch.device("cpu"), budget_bytes=0)
    stream = streamed.batches(4, shuffle=False, n_steps=8)
    next(stream)
    deadline = time.monotonic() + 5
    while len(images.reads) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(r) for r in images.reads] == [4, 4, 4]  # the batch yielded and the next two
    for _ in range(3):
        next(stream)  # the epoch's last batch (1 sample): nothing of the next epoch is read yet
    time.sleep(0.05)
    assert [len(r) for r in images.reads] == [4, 4, 4, 1]
    stream.close()


def test_a_streamed_stream_abandoned_early_stops_its_reader() -> None:
    _, streamed = both(source())
    stream = streamed.batches(2, shuffle=False)
    x, y = next(stream)
    stream.close()
    assert x[:, 0, 0, 0].tolist() == [30, 170]
    assert y.tolist() == [3, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_batches_on_cuda_come_through_pinned_buffers() -> None:
    src = source()
    cuda = torch.device("cuda")
    resident = ExperienceData.gather(src, EXPERIENCE, cuda)
    streamed = ExperienceData.gather(src, EXPERIENCE, cuda, budget_bytes=1)
    assert streamed.streamed
    g_resident = torch.Generator(device=cuda).manual_seed(2)
    g_streamed = torch.Generator(device=cuda).manual_seed(2)
    a = list(resident.batches(4, shuffle=True, generator=g_resident, n_steps=9))
    b = list(streamed.batches(4, shuffle=True, generator=g_streamed, n_steps=9))
    assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in b)
    assert_same(a, b)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_host_memory_gb_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match=f"host_memory_gb must be > 0, got {value}"):
        RunConfig(host_memory_gb=value)


def test_a_run_with_streamed_experiences_gives_the_resident_run_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import quick_run

    resident = quick_run(tmp_path / "resident", "lora", steps=5)
    reads: list[int] = []
    read = StreamedRows.read

    def counted(self: StreamedRows, idx: torch.Tensor, pin: bool) -> torch.Tensor:
        reads.append(len(idx))
        return read(self, idx, pin)

    monkeypatch.setattr(StreamedRows, "read", counted)
    streamed = quick_run(tmp_path / "streamed", "lora", steps=5, host_memory_gb=1e-9)  # every experience
    assert sum(reads) == 2 * 5 * 8 + 3 * (2 * 8)  # 2 x 5 steps of 8, and 3 evaluations of 2 x 8 test images
    assert streamed.accuracy == resident.accuracy
    assert [e.loss_mean for e in streamed.experiences] == [e.loss_mean for e in resident.experiences]


def test_the_host_budget_is_shared_by_every_experience_of_a_run() -> None:
    """Experiences are copied while the copies fit the budget together; the rest stream, so many
    test sets that each fit do not add up past it (X-TAIL's ten test sets: 13.5 GB)."""
    from cl_bench import config as config_
    from cl_bench.loop import gather_all
    from cl_bench.registry import SCENARIOS
    from tests.helpers import QUICK_SCENARIO

    scenario = config_.build(SCENARIOS.get("synthetic"), QUICK_SCENARIO, "synthetic").build(0)
    train, test = gather_all(scenario, torch.device("cpu"), 10**9)
    assert not any(d.streamed for d in [*train, *test])
    one = train[0].images.numel()
    train, test = gather_all(scenario, torch.device("cpu"), 2 * one + 1)  # both train sets, 1 byte more
    assert [d.streamed for d in train] == [False, False]
    assert [d.streamed for d in test] == [True, True]
