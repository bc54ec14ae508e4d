"""Synthetic stored-run rows for the batch-size experiments' verdict tests (C2 and C13): known accuracies plus noise."""

from __future__ import annotations

import numpy as np


def rows_for(acc, seeds: int, noise: float = 0.004, rng_seed: int = 0) -> list[dict]:
    """Stored-run rows: test accuracy ``acc[(arch, norm, batch, epochs)]`` plus Gaussian noise per seed."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for (arch, norm, batch, epochs), mean in acc.items():
        for s in range(seeds):
            a = float(np.clip(mean + noise * rng.standard_normal(), 0, 1))
            rows.append({"model": arch, "norm": norm, "batch_size": batch, "epochs": epochs, "seed": s,
                         "diverged": False, "final_test_acc": a, "train_eval_acc": 1.0})  # fmt: skip
    return rows
