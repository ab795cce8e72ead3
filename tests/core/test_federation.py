"""Federated runs (issue 19): partitions, client sampling, the sequential backend's rounds and
records, the exact reduction to the centralised run, determinism and bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cl_bench import config, loop
from cl_bench.errors import ConfigError, FederationError
from cl_bench.federation import client as client_
from cl_bench.federation.aggregate import state_bytes
from cl_bench.federation.config import FederationConfig
from cl_bench.federation.partition import client_seed, partition, sample_clients
from tests.helpers import CrashError, crash_before_steps, quick_run

FED = {"clients": 3, "rounds": 2, "local_steps": 2, "partition": "dirichlet", "alpha": 0.5}


# ----------------------------------------------------------------------------- partitions


def test_iid_partition_sizes_and_cover() -> None:
    labels = np.repeat(np.arange(4), 5)  # 20 samples
    parts = partition(labels, 3, "iid", seed=1)
    assert [len(p) for p in parts] == [7, 7, 6]
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted: the experience's order is kept
    again = partition(labels, 3, "iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 3, "iid", seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_partition_exact_sizes_with_fixed_seed() -> None:
    labels = np.repeat(np.arange(5), 40)  # 200 samples, 5 classes
    parts = partition(labels, 4, "dirichlet", alpha=0.3, seed=7, experience=2)
    sizes = [len(p) for p in parts]
    assert sizes == [len(p) for p in partition(labels, 4, "dirichlet", alpha=0.3, seed=7, experience=2)]
    assert sum(sizes) == 200
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))  # every sample exactly once
    # the draw itself, re-derived by hand: per class a shuffle and Dir(alpha) cut points
    rng = np.random.default_rng([7, 2])
    expected = [0, 0, 0, 0]
    for c in range(5):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(4, 0.3))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            expected[k] += len(piece)
    if min(expected) >= 1:  # the first draw was kept
        assert sizes == expected
    # label skew: with alpha 0.3 some client misses some class; iid clients hold every class
    held = [set(labels[p].tolist()) for p in parts]
    assert any(len(h) < 5 for h in held)


def test_dirichlet_redraws_until_every_client_has_min_samples() -> None:
    labels = np.repeat(np.arange(2), 10)
    parts = partition(labels, 5, "dirichlet", alpha=0.05, seed=0, min_samples=2)
    assert min(len(p) for p in parts) >= 2


def test_partition_errors_are_one_line() -> None:
    with pytest.raises(FederationError, match=r"clients = 30 is more than experience 1's 20"):
        partition(np.zeros(20, np.int64), 30, "iid", experience=1)
    with pytest.raises(FederationError, match="raise federation.alpha"):
        partition(np.repeat(np.arange(2), 3), 6, "dirichlet", alpha=0.01, min_samples=1)


def test_client_sampling() -> None:
    assert sample_clients(5, 5, seed=0, experience=0, round_=0) == [0, 1, 2, 3, 4]
    picked = sample_clients(10, 3, seed=0, experience=1, round_=2)
    assert len(picked) == 3
    assert picked == sorted(set(picked))
    assert picked == sample_clients(10, 3, seed=0, experience=1, round_=2)
    rounds = {tuple(sample_clients(10, 3, seed=0, experience=1, round_=r)) for r in range(6)}
    assert len(rounds) > 1
    assert client_seed(0, 1, 2, 3) == client_seed(0, 1, 2, 3) != client_seed(0, 1, 2, 4)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"clients": 3, "participation": 0}, r"participation must be in \(0, 1\]"),
        ({"clients": 3, "participation": 1.5}, r"participation must be in \(0, 1\]"),
        ({"clients": 3, "alpha": 0}, "alpha must be > 0"),
        ({"clients": 3, "alpha": -1.0}, "alpha must be > 0"),
        ({"clients": -1}, "clients must be >= 0"),
        ({"clients": 3, "rounds": 0}, "rounds must be >= 1"),
        ({"clients": 3, "partition": "pathological"}, "partition"),
        ({"clients": 3, "round": 2}, "unknown key 'round'"),
    ],
)
def test_bad_federation_config(args: dict, message: str) -> None:
    cfg = config.resolve([{"strategy": "lora", "scenario": "synthetic", "federation": args}])
    with pytest.raises(ConfigError, match=message):
        loop.plan(cfg)


def test_participation_and_local_steps() -> None:
    cfg = FederationConfig(clients=10, participation=0.25)
    assert cfg.per_round == 2  # round(2.5) -> 2
    assert FederationConfig(clients=10, participation=0.01).per_round == 1
    assert FederationConfig(clients=4, local_epochs=2).local_steps_for(30, 4) == 4  # 8 per client: 2 batches
    assert FederationConfig(clients=4, local_steps=5).local_steps_for(30, 4) == 5


def test_more_clients_than_samples_fails_before_the_run_starts(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="more than experience 0's 16 training samples"):
        quick_run(tmp_path, "lora", federation={"clients": 17})
    assert not (tmp_path / "runs" / "lora-test" / "result.json").exists()


def test_zero_shot_cannot_be_federated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trains nothing"):
        quick_run(tmp_path, "zero-shot", federation={"clients": 2})


def test_product_aggregation_without_lowrank_pairs_fails_before_any_client_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a client trained")

    monkeypatch.setattr("cl_bench.federation.rounds.train_client", no_training)
    with pytest.raises(FederationError, match="SoRA communicates no such pairs"):
        quick_run(tmp_path, "sora", federation={"clients": 2, "aggregation": "product"})
    assert not (tmp_path / "runs" / "sora-test" / "result.json").exists()


def test_product_aggregation_records_the_discarded_residual(tmp_path: Path) -> None:
    record = quick_run(tmp_path, "lora", federation={**FED, "aggregation": "product"})
    rounds = record.federation["rounds"]
    assert all(0.0 <= r["product_residual_mean"] <= r["product_residual_max"] <= 1.0 for r in rounds)
    assert any(r["product_residual_max"] > 0.0 for r in rounds[1:])  # clients' products differ
    plain = quick_run(tmp_path / "b", "lora", federation=FED)
    assert all("product_residual_max" not in r for r in plain.federation["rounds"])


def test_cli_bad_federation_is_one_line(tmp_path: Path) -> None:
    sets = ["--set", "federation.clients=3", "--set", "federation.alpha=0", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "cl_bench.cli", "run", "--strategy", "lora", "--scenario", "synthetic", *sets],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: federation.alpha must be > 0")


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("strategy", ["lora", "mora", "sora", "loraprune", "dylora", "lisa", "finetune"])
def test_one_client_one_round_is_the_centralised_run(tmp_path: Path, strategy: str) -> None:
    plain = quick_run(tmp_path / "a", strategy, steps=4)
    fed = quick_run(tmp_path / "b", strategy, steps=4, federation={"clients": 1, "local_steps": 4})
    assert fed.accuracy["matrix"] == plain.accuracy["matrix"]
    assert [e.loss_last for e in fed.experiences] == [e.loss_last for e in plain.experiences]
    assert fed.federation is not None
    assert len(fed.federation["rounds"]) == 2
    assert fed.federation["strategy_figures"] == "clients"  # K = 1: the only client's model


def test_rounds_record_and_bytes(tmp_path: Path) -> None:
    record = quick_run(tmp_path, "lora", federation={**FED, "participation": 2 / 3})
    fed = record.federation
    assert fed is not None
    assert fed["partition"] == [[len(p) for p in parts] for parts in _partitions(record)]
    assert len(fed["rounds"]) == 2 * 2  # experiences x rounds
    assert [(r["experience"], r["round"]) for r in fed["rounds"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    per_client = _lora_bytes(record)
    for r in fed["rounds"]:
        assert len(r["clients"]) == 2
        assert r["upload_bytes"] == [per_client] * 2
        assert r["download_bytes"] == [per_client] * 2
        part = fed["partition"][r["experience"]]
        assert r["client_samples"] == [part[c] for c in r["clients"]]
    assert fed["upload_bytes_total"] == fed["download_bytes_total"] == 4 * 2 * per_client
    assert fed["communication_bytes"] == 16 * per_client
    assert fed["bytes_per_round"] == 4 * per_client
    # the last round's seen accuracy is the matrix's seen accuracy after the experience (lora's
    # after_experience changes nothing)
    last = [r["seen_accuracy"] for r in fed["rounds"] if r["round"] == 1]
    assert last == pytest.approx(record.accuracy["seen"], abs=0)
    assert record.experiences[0].steps == 2 * 2  # the hooks' clock: rounds x local steps
    assert fed["strategy_figures"] == "server model (clients' not collected)"  # K > 1: the known gap


def _partitions(record) -> list[list[np.ndarray]]:
    cfg = record.config["federation_args"]
    return [
        partition(
            np.asarray(_train_labels(record, i)),
            cfg["clients"],
            cfg["partition"],
            alpha=cfg["alpha"],
            seed=cfg["partition_seed"],
            experience=i,
        )
        for i in range(2)
    ]


def _train_labels(record, i: int) -> list[int]:
    from cl_bench.registry import SCENARIOS

    scenario = config.build(SCENARIOS.get("synthetic"), record.config["scenario_args"], "s").build(
        order_seed=record.config["order_seed"]
    )
    from cl_bench.data import sample_ids

    ids = sample_ids(scenario.train_stream[i])
    return scenario.train_source.targets[ids].tolist()


def _lora_bytes(record) -> int:
    return record.experiences[0].adapter_bytes


def test_federated_run_is_deterministic(tmp_path: Path) -> None:
    a = quick_run(tmp_path / "a", "lora", federation=FED)
    b = quick_run(tmp_path / "b", "lora", federation=FED)
    assert a.accuracy["matrix"] == b.accuracy["matrix"]
    keys = ("clients", "seen_accuracy", "upload_bytes", "loss_mean")
    assert [[r[k] for k in keys] for r in a.federation["rounds"]] == [
        [r[k] for k in keys] for r in b.federation["rounds"]
    ]
    c = quick_run(tmp_path / "c", "lora", federation={**FED, "partition_seed": 1})
    assert c.accuracy["matrix"] != a.accuracy["matrix"]


def _session(tmp_path: Path, strategy: str, fed: dict) -> loop.Session:
    cfg = config.resolve(
        [
            {
                "strategy": strategy,
                "scenario": {"name": "synthetic", "n_classes": 4, "n_experiences": 2, "train_per_class": 8},
                "steps_per_experience": 4,
                "batch_size": 4,
                "device": "cpu",
                "out": str(tmp_path),
                "run_id": "s",
                "federation": fed,
            }
        ]
    )
    return loop.build_session(loop.plan(cfg))


def _task(session: loop.Session, c: int, state: dict) -> client_.ClientTask:
    fed = session.federation
    assert fed is not None
    return client_.ClientTask(0, 0, c, fed.partitions[0][c], client_seed(0, 0, 0, c), state, 2, 0, 0, 4)


@pytest.mark.parametrize("strategy", ["lora", "mora", "sora", "loraprune", "dylora", "lisa"])
def test_clients_are_independent_of_their_order(tmp_path: Path, strategy: str) -> None:
    """Client 2 uploads the same whether it runs first or after client 0: the server's model is
    restored after each client (what lets Flower run them in parallel)."""
    session = _session(tmp_path, strategy, {"clients": 3, "local_steps": 2})
    info = loop.training_info(session, 0)
    session.strategy.train()
    session.strategy.before_experience(info)
    before = {k: v.clone() for k, v in session.strategy.state_dict().items() if isinstance(v, torch.Tensor)}
    state = {k: v.clone() for k, v in session.strategy.communicated_state().items()}

    def run(c: int) -> client_.ClientResult:
        return client_.train_client(session, _task(session, c, state), info, restore=True, graphs_ready=True)

    first = run(2)
    run(0)
    second = run(2)
    assert first.state.keys() == second.state.keys()
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert any(not torch.equal(first.state[k], state[k]) for k in state)  # it did train
    after = session.strategy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored exactly


def _three_clients(
    tmp_path: Path, name: str
) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor], list[client_.ClientResult]]:
    """(strategy, its state_dict before the round, the download, the results) of one round of three
    clients of experience 0."""
    session = _session(tmp_path, name, {"clients": 3, "local_steps": 2})
    info = loop.training_info(session, 0)
    strategy = session.strategy
    strategy.train()
    strategy.before_experience(info)
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    state = {k: v.clone() for k, v in strategy.communicated_state().items()}
    done = [
        client_.train_client(session, _task(session, c, state), info, restore=True, graphs_ready=True)
        for c in range(3)
    ]
    return strategy, before, state, done


def test_only_communicated_tensors_change_in_a_round(tmp_path: Path) -> None:
    strategy, before, _, done = _three_clients(tmp_path, "lora")
    aggregated = strategy.aggregate([d.state for d in done], [1.0, 1.0, 1.0], "fedavg")
    strategy.load_communicated_state(aggregated)
    after = strategy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(aggregated)  # every communicated tensor moved, nothing else did
    for k in changed:
        assert any(v.shape == after[k].shape and torch.equal(v, after[k]) for v in aggregated.values())
    assert state_bytes(done[0].state) == sum(t.numel() * t.element_size() for t in done[0].state.values())


def test_lisa_clients_upload_the_blocks_they_trained_and_fedavg_does_not_shrink_them(tmp_path: Path) -> None:
    """Each LISA client sends the embedding, the head and the blocks it sampled in its round (not
    every block: those it never trained are the server's copy); a block only one client trained
    comes out of the aggregation as that client's tensor exactly, and a block no client sampled
    keeps its global value."""
    strategy, _, state, done = _three_clients(tmp_path, "lisa")
    block_keys = {k for k in state if ".resblocks." in k}
    assert block_keys  # blocks
    assert set(state) - block_keys  # and the embedding/head
    sent_blocks = []
    for res in done:
        sent = set(res.state) - (set(state) - block_keys)
        assert set(state) - block_keys <= set(res.state)  # embedding and head always travel
        assert sent  # some blocks
        assert sent < block_keys  # never all of them
        sent_blocks.append(sent)
    weights = [float(res.n_samples) for res in done]
    aggregated = strategy.aggregate([res.state for res in done], weights, "fedavg")
    for key in block_keys:
        senders = [i for i, keys in enumerate(sent_blocks) if key in keys]
        if not senders:
            assert key not in aggregated
        elif len(senders) == 1:
            assert torch.equal(aggregated[key], done[senders[0]].state[key])
    strategy.load_communicated_state(aggregated)
    unsampled = block_keys - set().union(*sent_blocks)
    assert all(torch.equal(strategy.communicated_state()[k], state[k]) for k in unsampled)


def test_federated_lora_learns(tmp_path: Path) -> None:
    """Plasticity: 4 clients, non-IID, 3 rounds of 4 local steps learn each experience far above
    chance (2 classes per experience: chance is 0.5 within an experience)."""
    record = quick_run(
        tmp_path,
        "lora",
        federation={"clients": 4, "rounds": 3, "local_steps": 4, "partition": "dirichlet", "alpha": 1.0},
        scenario_args={"n_classes": 4, "n_experiences": 2, "train_per_class": 16, "test_per_class": 8},
        lr=5e-3,
    )
    matrix = record.accuracy["matrix"]
    assert matrix[0][0] >= 0.85
    assert matrix[1][1] >= 0.85
    curve = [r["seen_accuracy"] for r in record.federation["rounds"] if r["experience"] == 0]
    assert curve[-1] > record.accuracy["initial"][0]


def test_killed_federated_run_resumes_to_the_same_matrix(tmp_path: Path, monkeypatch) -> None:
    """A crash inside experience 1's rounds: the rerun resumes from the end of experience 0 (the
    record's rounds of experience 0 kept, experience 1's rounds redone) and ends as the run that
    never stopped."""
    whole = quick_run(tmp_path / "a", "lora", federation=FED)
    with monkeypatch.context() as patch:
        crash_before_steps(patch, {3 * 2 * 2 + 3})  # 3 clients x 2 rounds x 2 steps, then 3 more
        with pytest.raises(CrashError):
            quick_run(tmp_path / "b", "lora", federation=FED)
    resumed = quick_run(tmp_path / "b", "lora", federation=FED)
    assert resumed.accuracy["matrix"] == whole.accuracy["matrix"]
    assert [r["seen_accuracy"] for r in resumed.federation["rounds"]] == [
        r["seen_accuracy"] for r in whole.federation["rounds"]
    ]
    assert resumed.federation["communication_bytes"] == whole.federation["communication_bytes"]
