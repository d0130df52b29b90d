"""Training a classifier head on the frozen backbone with Ray Train.

The route: `run` (checks, data, fit, calibration, the run folder, MLflow), `config` (TrainConfig),
`data` (labelled images into training inputs), `features` (the backbone's embeddings, cached),
`fit` (the Ray Train trainer), `backend` (TF_CONFIG for the workers, set without TensorFlow in the
controller), `loop_config` (the typed settings that cross into the workers), `loop` (the per-worker
training loop, step by step) and `worker_steps` (its TensorFlow side), with `checkpoints`, `seeds`,
`embedding_shards`, `tensorboard`, `worker_log` and `calibration` (temperature scaling).

May import: `catdog.analyse` (metrics), `catdog.cluster`, `catdog.model`, `catdog.io`,
`catdog.errors`, `catdog.process`, `catdog.tracking`.
"""
