"""ScoreConfig: everything one scoring run needs, validated before anything starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from catdog.errors import CatdogError
from catdog.io.file_reads import DEFAULT_MAX_FILE_BYTES, DEFAULT_READ_TIMEOUT_S
from catdog.io.imaging import DEFAULT_MAX_IMAGE_PIXELS
from catdog.model.options import PRECISIONS

PARTITION_COLUMNS = ("label",)

# Rows per predictor call. On CPU 64 halves Ray's per-batch cost against 32 at a modest predictor
# peak (benchmarks/README.md, Scoring speed); GPUs want larger batches.
DEFAULT_CPU_BATCH_SIZE = 64
DEFAULT_GPU_BATCH_SIZE = 128
# Rows per output file (at least): ~100-200 bytes a row, so a few MB per file -- analytics-friendly,
# while a crash loses at most this many rows of finished work (resume re-scores them).
DEFAULT_ROWS_PER_FILE = 20_000
# Seconds --use-gpu waits for an autoscaler to bring the first GPU node: cloud GPU nodes take
# minutes to boot and start Ray.
DEFAULT_WAIT_FOR_WORKERS_S = 600.0


@dataclass
class ScoreConfig:
    """One scoring run. `model` is a training run folder (model.keras + classes.json) or a .keras
    file with classes.json beside it; `input` a folder/URI or a Parquet/CSV manifest."""

    model: str
    input: str
    output: str
    model_uri: str | None = None  # an MLflow --model (catdog.tracking): the version scored; model is its download
    precision: str = "float32"
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    num_workers: int | None = None  # fixed pool; default: 1 on CPU, every GPU (growing with an autoscaler) on GPU
    min_workers: int | None = None  # autoscaling pool: needs max_workers (which alone means min 1)
    max_workers: int | None = None
    batch_size: int | None = None  # default: DEFAULT_CPU_BATCH_SIZE or DEFAULT_GPU_BATCH_SIZE
    overwrite: bool = False
    resume: bool = False
    partition_by: str | None = None  # "label": hive folders label=<class>/ (errors: __HIVE_DEFAULT_PARTITION__)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # per file's open + read; then a read_timeout row
    drop_unlisted: bool = False  # --resume: remove rows of paths the input no longer lists
    input_moved: bool = False  # --resume from another input than the output was scored from, on purpose
    scratch_dir: str | None = None  # local folder for resume and accounting buckets (default: system temp)
    follow_symlinks: bool = False
    top_k: int = 0  # > 0: top_k_labels / top_k_probs columns, the K best classes
    embeddings: bool = False  # an `embedding` column: the pooled backbone features
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    ray_address: str | None = None
    progress_interval_s: float = 10.0  # seconds between progress log lines
    assume_shared_storage: bool = False  # local paths are mounted on every node (catdog.cluster.checks)
    wait_for_workers_s: float = DEFAULT_WAIT_FOR_WORKERS_S  # --use-gpu: for the first GPU node

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise CatdogError for any inconsistent setting."""
        if not self.model or not self.input or not self.output:
            raise CatdogError("--model, --input and --output are all required")
        if self.precision not in PRECISIONS:
            raise CatdogError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.overwrite and self.resume:
            raise CatdogError("--overwrite and --resume exclude each other: replace the output, or finish it")
        if self.partition_by is not None and self.partition_by not in PARTITION_COLUMNS:
            raise CatdogError(f"--partition-by must be one of {PARTITION_COLUMNS}, got {self.partition_by!r}")
        if self.gpus_per_worker <= 0:
            raise CatdogError("--gpus-per-worker must be > 0")
        for name in ("num_workers", "min_workers", "max_workers", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CatdogError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_workers is not None and (self.min_workers is not None or self.max_workers is not None):
            raise CatdogError("give either --num-workers or --min-workers/--max-workers, not both")
        if self.min_workers is not None and self.max_workers is None:
            raise CatdogError("--min-workers needs --max-workers (alone, --max-workers means a pool from 1 up)")
        if self.min_workers is not None and self.min_workers > self.max_workers:
            raise CatdogError("--min-workers must be <= --max-workers")
        if self.max_image_pixels < 1:
            raise CatdogError("--max-image-pixels must be >= 1")
        if self.max_file_bytes < 1:
            raise CatdogError("--max-file-bytes must be >= 1")
        if not self.read_timeout_s > 0:  # also refuses NaN
            raise CatdogError(f"--read-timeout must be > 0 seconds, got {self.read_timeout_s}")
        if self.drop_unlisted and not self.resume:
            raise CatdogError("--drop-unlisted goes with --resume")
        if self.input_moved and not self.resume:
            raise CatdogError("--input-moved goes with --resume")
        if self.top_k < 0:
            raise CatdogError(f"--top-k must be >= 1, got {self.top_k}")
        if self.rows_per_file < 1:
            raise CatdogError("--rows-per-file must be >= 1")
        if self.wait_for_workers_s < 0:
            raise CatdogError("--wait-for-workers must be >= 0 seconds")

    def output_columns(self, info) -> dict:
        """The optional columns this run adds, as `predictions_schema` keywords, checked against the model.

        Raises:
            CatdogError: --top-k above the model's class count, or --embeddings for a model whose
                feature width its archive does not tell.
        """
        if self.top_k > len(info.class_names):
            raise CatdogError(f"--top-k {self.top_k} exceeds the model's {len(info.class_names)} classes")
        if self.embeddings and not info.feature_width:
            raise CatdogError(f"--embeddings: cannot tell the feature width of {info.location}")
        return {"top_k": self.top_k, "embedding_width": info.feature_width if self.embeddings else 0}

    @property
    def effective_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_GPU_BATCH_SIZE if self.use_gpu else DEFAULT_CPU_BATCH_SIZE

    def to_dict(self) -> dict:
        return asdict(self)
