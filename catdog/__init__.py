"""catdog: distributed batch image classification on Ray and TensorFlow/Keras.

Wings, each a sub-package whose docstring says what it may import; a wing imports only wings
listed before it, and the root modules (`errors`, `process`, `tracking`):

    io       storage, input listing, file reads, decoding          (no Ray, no TensorFlow)
    model    build, load, inference copy, run folder, export
    cluster  Ray session, cluster checks and capacity, actor pools
    score    a scoring run: listing -> plan -> pipeline -> predictions folder -> accounting
    analyse  metrics, plots, report, evaluation (scores, then measures)
    train    a training run: data -> features -> Ray Train fit -> calibration -> run folder

Root: `cli` (what every job entrypoint shares), `demo`, `errors`, `process` (environment and log
format of every process), `tracking` (MLflow). Heavy modules (TensorFlow, Ray) are imported by
the modules that need them, not here. docs/architecture.md walks both journeys.
"""

__version__ = "0.1.0"
