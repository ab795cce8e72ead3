"""The Flower backend (issue 19): clients in Flower's simulation engine (Ray actors) give the same run
as the sequential backend, replicas replay the experiences they missed, and the plumbing (tensor
records, errors, refused configs) is exact."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from cl_bench.errors import DivergenceError, FederationError
from cl_bench.federation import flower
from cl_bench.federation.config import FederationConfig
from tests.helpers import quick_run

# K = 3, R = 2, two of the three clients per round, Dirichlet shares; tiny-vit (no text tower) and
# one local step keep the run short: Ray's start and every actor's imports dominate.
FED = {"clients": 3, "rounds": 2, "local_steps": 1, "participation": 0.67, "partition": "dirichlet"}
RUN: dict[str, Any] = {
    "backbone": "tiny-vit",
    "strategy_args": {"merge_each_experience": True},  # after_experience folds B·A into W0
}


def test_tensor_record_round_trip_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "blocks.0.attn.q.B": torch.randn(4, 3, generator=g),
        "bf16": torch.randn(5, 2, generator=g).bfloat16(),  # numpy has no bf16: raw bytes
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "half": torch.randn(2, 2, generator=g).half(),
        "ids": torch.tensor([3, -1, 2**40]),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
    }
    back = flower.from_record(flower.to_record(state), torch.device("cpu"))
    assert list(back) == list(state)  # the order of the keys is kept
    for name, t in state.items():
        got = back[name]
        assert got.dtype == t.dtype, name
        assert got.shape == t.shape, name
        bits = torch.int16 if t.dtype == torch.bfloat16 else None
        assert torch.equal(got.view(bits) if bits else got, t.view(bits) if bits else t), name


def test_record_of_another_serialisation_is_refused() -> None:
    record = flower.ArrayRecord({"w": flower.Array(np.zeros(3, np.float32))})  # np.save bytes
    with pytest.raises(FederationError, match="'w' arrived as 'numpy.ndarray'"):
        flower.from_record(record, torch.device("cpu"))


def _session(tmp_path: Path, device: str, **fed: Any) -> Any:
    return SimpleNamespace(
        federation=SimpleNamespace(cfg=FederationConfig(backend="flower", **fed)),
        plan=SimpleNamespace(device=torch.device(device), run_dir=tmp_path),
    )


def test_flower_refuses_what_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="needs clients >= 2: one client is the centralised run"):
        flower.FlowerBackend(_session(tmp_path, "cpu", clients=1))
    with pytest.raises(FederationError, match="client_gpus = 0 but the run is on CUDA"):
        flower.FlowerBackend(_session(tmp_path, "cuda", clients=4, client_gpus=0.0))
    with pytest.raises(FederationError, match=r"client_cpus = 1000.0 is more than one client can get here"):
        flower.FlowerBackend(_session(tmp_path, "cpu", clients=4, client_cpus=1000.0))
    assert not (tmp_path / flower.FEDERATION_DIR).exists()  # refused before anything started


def _error_reply(err: Exception) -> flower.Reply:
    try:  # raised, as in a client, so that it has a traceback
        raise err
    except Exception as raised:
        return flower.Reply(flower.error_content(raised), None)


def _task(client: int = 2) -> flower.ClientTask:
    return flower.ClientTask(
        experience=1,
        round=0,
        client=client,
        indices=np.array([0, 3]),
        seed=11,
        state={"w": torch.ones(2)},
        n_steps=1,
        first_step=4,
        schedule_start=0,
        schedule_steps=2,
    )


def test_client_errors_reach_the_server_as_one_line_errors() -> None:
    cpu = torch.device("cpu")
    # a cl-bench error in a client is the same error on the server (e.g. a diverged client)
    with pytest.raises(DivergenceError, match="^non-finite loss$"):
        flower.FlowerBackend._result(_task(), _error_reply(DivergenceError("non-finite loss")), cpu)
    with pytest.raises(FederationError, match=r"client 2 \(experience 1, round 0\) failed: KeyError: 'x'"):
        flower.FlowerBackend._result(_task(), _error_reply(KeyError("x")), cpu)
    with pytest.raises(FederationError, match=r"Flower could not run client 2 .*: 1: actor died"):
        flower.FlowerBackend._result(_task(), flower.Reply(None, "1: actor died"), cpu)


def test_task_message_round_trip() -> None:
    task = _task()
    info = flower.ExperienceInfo(1, (2, 3), (0, 1, 2, 3), torch.tensor([0, 1, 2, 3]), 0, 16, 2, True)
    content = flower.task_message(task, info, "tok", Path("/x"), cpus=2.0)
    back = flower.task_from_message(content, torch.device("cpu"))
    assert (back.experience, back.round, back.client, back.seed) == (1, 0, 2, 11)
    assert (back.n_steps, back.first_step, back.schedule_start, back.schedule_steps) == (1, 4, 0, 2)
    assert back.indices is not None
    assert back.indices.tolist() == [0, 3]
    assert torch.equal(back.state["w"], torch.ones(2))
    assert flower.info_of(content) == flower.info_fields(info)
    t = flower.fields_of(content, "task")
    assert (t["token"], t["directory"], t["cpus"]) == ("tok", "/x", 2.0)


def test_replica_never_goes_back_an_experience() -> None:
    replica = flower.Replica("tok", Path("/x"), session=None, finished=2)  # type: ignore[arg-type]
    with pytest.raises(FederationError, match="task of experience 1 after finishing experience 1"):
        replica.replay(1)


@pytest.mark.slow  # ~40 s: Ray's start and the actors' imports (runs in tox's slow env)
def test_flower_matches_sequential_and_replicas_catch_up(tmp_path: Path, monkeypatch: Any) -> None:
    """The same federated run through both backends: the same accuracy matrix, losses and bytes; the
    clients ran in the Ray actors (train_client fails in this process); a fresh replica that replays
    every experience from the server's final states holds the server's final model exactly."""
    sequential = quick_run(tmp_path / "seq", "lora", federation={**FED, "backend": "sequential"}, **RUN)

    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a Flower client ran in the server's process")

    monkeypatch.setattr(flower, "train_client", not_here)
    server_final: dict[str, torch.Tensor] = {}
    close = flower.FlowerBackend.close

    def keep_final(self: flower.FlowerBackend) -> None:  # after the last experience, as closed
        server_final.update({k: v.clone() for k, v in self.session.strategy.state_dict().items()})
        close(self)

    monkeypatch.setattr(flower.FlowerBackend, "close", keep_final)
    flwr_run = quick_run(tmp_path / "flwr", "lora", federation={**FED, "backend": "flower"}, **RUN)

    assert flwr_run.status == sequential.status == "ok"
    assert flwr_run.federation is not None
    assert sequential.federation is not None
    assert flwr_run.federation["backend"] == "flower"
    np.testing.assert_allclose(flwr_run.accuracy["matrix"], sequential.accuracy["matrix"], atol=1e-6)
    fl_rounds, seq_rounds = flwr_run.federation["rounds"], sequential.federation["rounds"]
    assert len(fl_rounds) == len(seq_rounds) == 4
    for a, b in zip(fl_rounds, seq_rounds, strict=True):
        for key in ("experience", "round", "clients", "client_samples", "upload_bytes", "download_bytes"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["loss_mean"], b["loss_mean"], rtol=1e-5)
        np.testing.assert_allclose(a["seen_accuracy"], b["seen_accuracy"], atol=1e-6)
    assert [len(r["clients"]) for r in fl_rounds] == [2, 2, 2, 2]
    assert flwr_run.federation["communication_bytes"] == sequential.federation["communication_bytes"] > 0

    # a replica that never trained catches up from the final states the server left
    directory = tmp_path / "flwr" / "runs" / "lora-test" / flower.FEDERATION_DIR
    assert sorted(p.name for p in directory.glob("final_*.pt")) == ["final_0.pt", "final_1.pt"]
    replica = flower.Replica.build("fresh", directory)
    fresh = {k: v.clone() for k, v in replica.session.strategy.state_dict().items()}
    replica.replay(2)
    assert (replica.finished, replica.current) == (2, None)
    state = replica.session.strategy.state_dict()
    assert list(state) == list(server_final)
    differ = [k for k in state if not torch.equal(state[k], server_final[k])]
    assert not differ, differ
    # the replay folded B·A into every adapted layer's frozen weight, as the server did
    bases = [k for k in state if k.endswith(".base.weight")]
    assert len(bases) == len([k for k in state if k.endswith(".A")]) > 0
    assert not [k for k in bases if torch.equal(state[k], fresh[k])]
