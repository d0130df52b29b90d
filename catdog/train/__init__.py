"""Training a classifier head on the frozen backbone with Ray Train.

The route: `run` (checks, data, fit, calibration, the run folder, MLflow), `config` (TrainConfig),
`data` (labelled images into training inputs), `features` (the backbone's embeddings, cached),
`fit` (the Ray Train trainer), `backend` (TF_CONFIG for the workers, set without TensorFlow in the
controller), `loop` (the per-worker training loop), with `checkpoints`, `seeds`,
`embedding_shards`, `tensorboard`, `worker_log` and `calibration` (temperature scaling).

May import: `catdog.analyse` (metrics), `catdog.cluster`, `catdog.model`, `catdog.io`,
`catdog.errors`, `catdog.process`, `catdog.tracking`.
"""
