"""Seeds of each training worker's own randomness: dropout masks, augmentation, cached-mode shuffles.

The run seed builds the head, so every worker starts from the same weights (MWMS also broadcasts
rank 0's initial values, the dropout seed state included). Then each worker re-seeds its own
randomness, dropout masks and augmentation, from `worker_seed` (run seed, rank, first epoch it
trains), so workers do not repeat each other's masks. Cached-mode shards are disjoint by
construction (dealt out by the driver), so each worker reshuffles its own shard with its own seed.
"""

from __future__ import annotations

import numpy as np


def worker_seed(run_seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's own randomness (dropout masks, augmentation) from `epoch` on.

    NumPy's SeedSequence of (run seed, rank, epoch): independent streams per rank, not neighbouring
    integers; the epoch is the first one the worker trains, so a resumed worker group does not
    replay the masks of epoch 1.
    """
    return int(np.random.SeedSequence([run_seed, rank, epoch]).generate_state(1)[0])


def shuffle_seed(run_seed: int, epoch: int) -> int:
    """Seed of cached mode's per-epoch shuffle, before each rank mixes in its own rank (`worker_seed`)."""
    return run_seed * 1000 + epoch


def seed_worker_randomness(models: list, seed: int) -> list[int]:
    """Seed Python, NumPy, TensorFlow and Keras with `seed`, and every random layer of `models`.

    A Keras random layer (Dropout, RandomFlip, ...) draws from its own seed generator, whose state
    was set when the layer was built (and under MWMS broadcast from rank 0), so it is assigned here
    explicitly; weights are not touched. Returns the seeds the layers got, in order.
    """
    import keras

    keras.utils.set_random_seed(seed)
    states = [v for model in models for v in model.variables if v.name == "seed_generator_state"]
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(len(states))]
    for state, value in zip(states, seeds):
        state.assign(np.array([value, 0], dtype=state.dtype))  # the [seed, counter] a SeedGenerator starts from
    return seeds
