"""P3: K = 20 models (5 folds x 4 seeds) as one vmapped program against 20 sequential trainings.

Both sides go through `moemil_jax.sweep.train_sweep` (vectorize=True / False: the same
members, batches and schedule, agreeing to round-off), wall time from the call to the
result, so compilation is included on both sides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import logging

from moemil_jax import sweep as sweep_lib
from moemil_jax.bench import training
from moemil_jax.configs import moemil, test as test_config


def run(quick: bool = False, workdir: str | Path | None = None) -> dict[str, Any]:
    import tempfile

    workdir = Path(workdir or tempfile.mkdtemp(prefix="moemil_bench_"))
    # Small bags: a sweep is many short trainings. Enough patients that every validation
    # fold holds both response classes (sweep's DeLong report needs two of each).
    regime = training.Regime("sweep", 60 if quick else 128, 48 if quick else 64, 400)
    config = test_config.get_config() if quick else moemil.get_config()
    config.store = str(training.bench_store(workdir, regime))
    config.data.radiomics_lasso = False
    config.split.folds = 5
    config.train.epochs = 2 if quick else 5
    folds, seeds = (0, 1, 2, 3, 4), ((0, 1) if quick else (0, 1, 2, 3))
    members = sweep_lib.grid(folds=folds, seeds=seeds)
    cohort = sweep_lib.load(config)
    vmapped = sweep_lib.train_sweep(config, cohort, members, vectorize=True)
    sequential = sweep_lib.train_sweep(config, cohort, members, vectorize=False)
    out = {
        "models": len(members), "epochs": int(config.train.epochs), "patients": int(cohort.num_patients),
        "vmapped_s": float(vmapped.seconds), "sequential_s": float(sequential.seconds),
        "speedup": float(sequential.seconds / vmapped.seconds),
        "note": f"K={len(members)}, {config.train.epochs} epochs, {cohort.num_patients} patients, "
                "compile included",
    }
    logging.info("P3: %s", out)
    return out
