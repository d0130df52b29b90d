"""The training checkpoint: head, best head, optimizer state and loop state, saved and restored.

Rank 0 attaches one to every epoch's `ray.train.report`; a restarted worker group restores the
latest and resumes at the next epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HEAD_WEIGHTS = "head.weights.h5"
BEST_HEAD_WEIGHTS = "best_head.weights.h5"
OPTIMIZER_STATE = "optimizer.npz"
STATE_FILE = "state.json"


def restore_checkpoint(checkpoint, head, best_head, optimizer) -> dict:
    """Load head, best head, optimizer and loop state from a checkpoint.

    Args:
        checkpoint: a `ray.train.Checkpoint`, or None for a fresh start.
        head: the (mirrored) head being trained; loaded in place.
        best_head: the copy of the best head so far; loaded in place (without a checkpoint: `head`'s weights).
        optimizer: the built optimizer; its variables are loaded in place.

    Returns:
        The loop state: last epoch, history, best validation loss and epoch, early-stopping counters.
    """
    if checkpoint is None:
        best_head.set_weights(head.get_weights())
        return _fresh_state()
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        head.load_weights(folder / HEAD_WEIGHTS)
        best_head.load_weights(folder / BEST_HEAD_WEIGHTS)
        saved = np.load(folder / OPTIMIZER_STATE)
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i}"])
        return json.loads((folder / STATE_FILE).read_text())


def save_checkpoint(folder: Path, head, best_head, optimizer, state: dict) -> None:
    """Write head, best head, optimizer variables and loop state into `folder` (read by `restore_checkpoint`)."""
    head.save_weights(folder / HEAD_WEIGHTS)
    best_head.save_weights(folder / BEST_HEAD_WEIGHTS)
    np.savez(folder / OPTIMIZER_STATE, **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    (folder / STATE_FILE).write_text(json.dumps(state))


def _fresh_state() -> dict:
    return {"epoch": 0, "history": [], "best_val_loss": None, "best_epoch": 0, "bad_epochs": 0, "stopped_early": False}
