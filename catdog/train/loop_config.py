"""WorkerLoopConfig: everything the driver hands each Ray Train worker's loop (catdog.train.loop).

It crosses the Ray Train boundary pickled inside `train_loop_config`, which Ray wants to be a dict:
`as_train_loop_config` wraps it on the driver, `from_train_loop_config` unwraps it on the worker.
The Train controller unpickles it too and deliberately never imports TensorFlow
(catdog.train.backend), so this module imports neither TensorFlow nor Keras: the model spec
travels as `ModelSpec.to_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from catdog.train.config import MODES

if TYPE_CHECKING:
    from catdog.train.config import TrainConfig

LOOP_KEY = "loop"  # the one key of the train_loop_config dict Ray Train passes to every worker


@dataclass(frozen=True)
class WorkerLoopConfig:
    """Settings of the per-worker loop; built on the driver by `from_train_config`."""

    model_spec: dict  # catdog.model.build.ModelSpec.to_dict(): the head (end-to-end: and backbone) to build
    mode: str  # "cached" (embeddings from the object store) or "end-to-end" (decoded images, Ray Data shards)
    weights: str | None  # end-to-end backbone weights: "imagenet", a weights file, None for random init
    seed: int  # the run seed: initial head, shuffles and each worker's own seeds (catdog.train.seeds)
    backbone_seed: int  # a random-init backbone's seed, the same the driver built its backbone with
    backbone_fingerprint: str  # the driver's backbone weights; an end-to-end worker checks it built the same
    epochs: int  # the last epoch; a resumed worker group starts after its checkpoint's epoch
    learning_rate: float  # Adam's learning rate
    patience: int  # epochs without a better val_loss before stopping early; 0: never
    augment: bool  # end-to-end only: random flip, rotation and crop of training batches
    use_gpu: bool  # each worker's TensorFlow set-up (catdog.model.tensorflow_setup)
    per_worker_batch_size: int  # examples per step on each worker: the global batch over the workers
    tensorboard_dir: str | None  # where rank 0 writes epoch scalars; None: not written
    feature_refs: dict | None = None  # cached: object refs {"train": [per rank], "val": [per rank], "val_paths"}
    feature_handoff: Any = None  # cached, fit started before the embeddings: FeatureHandoff actor that gives the refs

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.epochs < 1 or self.per_worker_batch_size < 1:
            raise ValueError(f"epochs and per_worker_batch_size must be at least 1, got {self.epochs}, "
                             f"{self.per_worker_batch_size}")
        if self.feature_refs is not None and self.feature_handoff is not None:
            raise ValueError("give the workers feature_refs or a feature_handoff, not both")
        if self.end_to_end and (self.feature_refs is not None or self.feature_handoff is not None):
            raise ValueError("end-to-end mode reads Ray Data shards, not feature refs")

    @classmethod
    def from_train_config(cls, config: TrainConfig, model_spec: dict, *, backbone_seed: int,
                          backbone_fingerprint: str, tensorboard_dir: str | None) -> WorkerLoopConfig:
        """The loop's settings of a run, without its feature refs (`with_features` adds them)."""
        return cls(model_spec=dict(model_spec), mode=config.mode, weights=config.weights_arg, seed=config.seed,
                   backbone_seed=backbone_seed, backbone_fingerprint=backbone_fingerprint, epochs=config.epochs,
                   learning_rate=config.learning_rate, patience=config.patience, augment=config.augment,
                   use_gpu=config.use_gpu, per_worker_batch_size=config.per_worker_batch_size,
                   tensorboard_dir=tensorboard_dir)

    @property
    def end_to_end(self) -> bool:
        return self.mode == "end-to-end"

    def with_features(self, refs: dict | None = None, handoff: Any = None) -> WorkerLoopConfig:
        """A copy whose workers read the embeddings from `refs`, or wait for them at `handoff`."""
        return replace(self, feature_refs=refs, feature_handoff=handoff)

    def as_train_loop_config(self) -> dict:
        """The `train_loop_config` of the TensorflowTrainer; refused if cached-mode workers could not find
        their embeddings (checked here, on the driver: on a worker it would fail every restart)."""
        if not self.end_to_end and self.feature_refs is None and self.feature_handoff is None:
            raise ValueError("cached mode needs feature_refs or a feature_handoff")
        return {LOOP_KEY: self}

    @staticmethod
    def from_train_loop_config(train_loop_config: dict) -> WorkerLoopConfig:
        """The config inside the dict each worker gets (made by `as_train_loop_config`)."""
        loop = train_loop_config.get(LOOP_KEY) if isinstance(train_loop_config, dict) else None
        if not isinstance(loop, WorkerLoopConfig):
            raise TypeError(f"train_loop_config must be {{{LOOP_KEY!r}: WorkerLoopConfig}}, got {train_loop_config!r}")
        return loop
