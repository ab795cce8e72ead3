from __future__ import annotations

import torch

from cl_bench.evaluate import allowed_classes, n_correct

PER_EXP = [[0, 1], [2, 3], [4, 5]]


def classes(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def test_seen_label_space_uses_classes_up_to_max_of_row_and_column() -> None:
    def seen(row: int, col: int) -> list[int]:
        return classes(
            allowed_classes(
                6, PER_EXP, row, col, label_space="seen", protocol="class", device=torch.device("cpu")
            )
        )

    assert seen(-1, 0) == [0, 1]  # row b: the test experience's own and earlier classes
    assert seen(-1, 2) == [0, 1, 2, 3, 4, 5]
    assert seen(0, 0) == [0, 1]
    assert seen(0, 1) == [0, 1, 2, 3]  # a future experience: seen classes plus its own
    assert seen(2, 0) == [0, 1, 2, 3, 4, 5]


def test_all_and_task_label_spaces() -> None:
    cpu = torch.device("cpu")
    assert classes(
        allowed_classes(6, PER_EXP, 0, 0, label_space="all", protocol="class", device=cpu)
    ) == list(range(6))
    assert classes(allowed_classes(6, PER_EXP, 2, 1, label_space="seen", protocol="task", device=cpu)) == [
        2,
        3,
    ]


def test_n_correct_only_considers_allowed_classes() -> None:
    logits = torch.tensor([[0.1, 0.9, 5.0], [2.0, 0.0, 1.0]])
    targets = torch.tensor([1, 0])
    assert n_correct(logits, targets, torch.tensor([True, True, True])) == 1
    assert n_correct(logits, targets, torch.tensor([True, True, False])) == 2
