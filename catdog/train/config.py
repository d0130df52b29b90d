"""TrainConfig: every setting of a training run, checked before Ray or TensorFlow start."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from catdog.errors import CatdogError, InputError, ModelLoadError
from catdog.io import storage
from catdog.model.options import HEADS

MODES = ("cached", "end-to-end")
# --placement -> Ray's placement-group strategy for the Train workers. SPREAD is best effort: on
# fewer nodes than workers some share a node rather than wait.
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # first bytes of every Keras .weights.h5 / .h5 file
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "catdog", "features")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the `jobs.train` flags, one field each).

    `batch_size` is global: each of the `num_workers` workers takes `batch_size // num_workers`
    examples per step. `patience` 0 turns early stopping off. `cache_dir` None means
    `~/.cache/catdog/features`. On a cluster of several nodes, local `output` and cache paths are
    refused unless `assume_shared_storage` (catdog.cluster.checks). With a tracking URI the run is
    logged to MLflow from the driver and, with `register_as`, registered (catdog.tracking).
    """

    data: str
    output: str
    val_data: str | None = None
    val_fraction: float = 0.2
    seed: int = 123
    image_size: int = 180
    head: str = "gap"
    hidden_units: int = 384
    dropout: float = 0.2
    weights: str = "imagenet"
    mode: str = "cached"
    augment: bool = False
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 3
    num_workers: int = 1
    placement: str = "pack"
    use_gpu: bool = False
    # Fractional by default: on a 2-core machine whole CPUs for the workers leave none for the
    # Ray Data feature stage and the run hangs waiting for resources.
    cpus_per_worker: float = 0.5
    cache_dir: str | None = None
    keep_checkpoints: int = 2
    max_failures: int = 1
    overwrite: bool = False
    assume_shared_storage: bool = False  # local --output/--cache-dir are on storage every node sees
    mlflow_uri: str | None = None  # MLflow tracking server; None: MLFLOW_TRACKING_URI, else no tracking
    mlflow_experiment: str | None = None  # None: MLFLOW_EXPERIMENT_NAME, else "catdog"
    register_as: str | None = None  # registered model name for the run folder (needs tracking)

    def validate(self) -> None:
        """Check every setting that does not need the data; raise CatdogError naming the problem."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.placement not in PLACEMENTS:
            problems.append(f"--placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.head not in HEADS:
            problems.append(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.val_data is None and not 0.0 < self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.image_size < 32:
            problems.append(f"--image-size must be at least 32 (ResNet50 downsamples by 32), got {self.image_size}")
        for name in ("epochs", "batch_size", "num_workers", "keep_checkpoints", "hidden_units"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < self.num_workers:
            problems.append(f"--batch-size ({self.batch_size}) must be at least --num-workers ({self.num_workers})")
        if self.learning_rate <= 0:
            problems.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.patience < 0:
            problems.append(f"--patience must be 0 (off) or more, got {self.patience}")
        if self.cpus_per_worker <= 0:
            problems.append(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            problems.append(f"--max-failures must be -1 (unlimited) or more, got {self.max_failures}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.register_as is not None and not self.tracking_uri:
            problems.append("--register-as needs an MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI")
        if self.augment and self.mode != "end-to-end":
            problems.append("--augment needs --mode end-to-end (cached features are computed once, without augmentation)")
        if problems:
            raise CatdogError("; ".join(problems))
        if self.weights not in ("imagenet", "none"):
            if not storage.exists(self.weights):
                raise InputError(f"--weights: no weights file at {self.weights} (use imagenet, none or a .weights.h5 path)")
            if storage.read_head(self.weights, len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                # checked here, before Ray starts: the backbone itself loads while Ray starts
                raise ModelLoadError(f"could not load backbone weights {self.weights!r}: not an HDF5 file "
                                     "(expected a Keras .weights.h5 file)")

    @property
    def tracking_uri(self) -> str | None:
        """The MLflow tracking URI the run logs to, or None: no tracking."""
        return self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    @property
    def weights_arg(self) -> str | None:
        """The weights argument for catdog.model.build: None for random init."""
        return None if self.weights == "none" else self.weights

    @property
    def feature_cache_dir(self) -> str:
        return self.cache_dir or os.path.expanduser(DEFAULT_CACHE_DIR)

    @property
    def per_worker_batch_size(self) -> int:
        return max(1, self.batch_size // self.num_workers)

    def to_dict(self) -> dict:
        return asdict(self)
