"""The model: building it, saving and loading it, its inference copy, its run folder, its export.

`build` (ResNet50 backbone, heads, preprocessing; the one place that knows them), `options`
(precisions and heads, importable without TensorFlow), `inference` (the checked, BatchNorm-folded
inference copy every predictor loads), `run_folder` (the training run folder: the only code that
knows its file names), `tensorflow_setup` (threads, devices, quiet logs) and `export` (a
TensorFlow SavedModel for serving).

May import: `catdog.io`, `catdog.errors`, `catdog.process`.
"""
