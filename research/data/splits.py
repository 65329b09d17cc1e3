"""Deterministic seeded train/validation/test split, and seeded evaluation subsets."""

from __future__ import annotations

import numpy as np

from research.data.config import SPLITS
from research.data.records import Review


def seeded_split(
    records: list[Review],
    ratios: tuple[float, float, float],
    seed: int,
    keep_test_entities_in_train: bool,
) -> dict[str, list[int]]:
    """Positions of ``records`` per split (ascending), a pure function of the arguments.

    Records are shuffled with ``seed``. With ``keep_test_entities_in_train``, the first record
    of each user and of each item in that order goes to train, so no validation/test user or
    item is unseen (PETER's rule); validation and test then take round(ratio * n) records each
    from the rest, in shuffled order, and may come out smaller when few records are left.
    """
    order = np.random.default_rng(seed).permutation(len(records)).tolist()
    forced_train = set()
    if keep_test_entities_in_train:
        seen_users, seen_items = set(), set()
        for position in order:
            record = records[position]
            if record.user not in seen_users or record.item not in seen_items:
                forced_train.add(position)
                seen_users.add(record.user)
                seen_items.add(record.item)
    free = [p for p in order if p not in forced_train]
    num_validation = round(ratios[1] * len(records))
    num_test = round(ratios[2] * len(records))
    validation = free[:num_validation]
    test = free[num_validation : num_validation + num_test]
    train = free[num_validation + num_test :] + sorted(forced_train)
    return dict(zip(SPLITS, (sorted(train), sorted(validation), sorted(test)), strict=True))


def seeded_subset(size: int, count: int, seed: int) -> np.ndarray | None:
    """``count`` distinct indices of ``range(size)`` drawn with ``seed``, ascending.

    None when ``count`` is 0 or covers everything (use the whole split).
    """
    if not count or count >= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(size, size=count, replace=False))
