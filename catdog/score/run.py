"""A scoring run: list the input, plan against what the output holds, run the pipeline, account.

Two paths, both keeping the listing in the output's `_listing/`:

- **streaming** (a folder or prefix into a new or empty output): the listing runs as the
  pipeline's source (`sources.ListingSource`), so decoding starts with the first chunk;
- **planned** (a resume of a non-empty output, a manifest, or a listing given in memory): the
  input is listed into `_listing/` first, then `catdog.score.ledger` compares it with the rows already
  written, bucket by bucket, drops repeated paths and writes what is left to score into `_todo/`.

Before anything is written, a run that joins a cluster checks it (`_check_cluster`): local paths
on a cluster of several nodes are refused unless shared (`catdog.cluster.checks`), and
`--use-gpu` needs a GPU or an autoscaler that can add one (`catdog.cluster.capacity`).

Either way `_SUCCESS.json` is written only after accounting (`PredictionsFolder.account`) finds
exactly one row per listed file. The driver keeps counters, never the list of paths: memory does
not grow with the input (see docs/operations.md, Sizing); the buckets live in a local scratch
folder (`--scratch-dir`).

One run per output: the run holds the output's lease (`catdog.score.lease`) from before it
touches anything until its summary is written; a second run exits 2 naming the holder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa

import catdog
from catdog.cluster.session import init_ray
from catdog.errors import TRANSIENT_ERROR_KINDS, CatdogError, ModelLoadError
from catdog.io import inputs
from catdog.score import ledger, progress, sources
from catdog.score.config import ScoreConfig
from catdog.score.pipeline import MAX_PATHS_PER_BLOCK, block_rows, run_pipeline
from catdog.score.predictions_folder import AccountingError, PredictionsFolder, new_run_id, now_iso, predictions_schema

logger = logging.getLogger(__name__)

_PATHS = pa.schema([(inputs.PATH_COLUMN, pa.string())])


@dataclass
class _Outcome:
    """What one run did before accounting: counters only."""

    listed: int = 0
    scored: int = 0
    changed: int = 0
    removed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    retried: int = 0  # rows with a transient error scored again
    kept_unlisted: object = None  # a stream of tables of paths kept from an earlier listing
    pool: dict | None = None  # the predictor pool: min, max, why, peak (None: nothing scored)


def score(config: ScoreConfig) -> dict:
    """Score every image of `config.input` into `config.output`; return the _SUCCESS.json summary.

    Raises:
        InputError: missing or empty input (nothing is written).
        ModelLoadError: missing, unsafe or inconsistent model (nothing is written).
        OutputExistsError: output not empty and neither overwrite nor resume asked, or an output
            that is a root, the home folder, or overlaps the input (nothing is written).
        LocalPathOnClusterError: a local path on a cluster of several nodes (nothing is written).
        ClusterResourceError: --use-gpu with no GPU to be had, or none in time (nothing is written).
        OutputBusyError: another run holds the output (nothing is touched).
        AccountingError: the written rows do not match the listed files (exit 1).
    """
    started = time.monotonic()
    folder, source = check_before_work(config)
    return _score_source(config, folder, source, started)


def score_listing(config: ScoreConfig, listing: inputs.InputListing, started: float | None = None) -> dict:
    """Score an already listed input (see `score`); files may change between listing and reading."""
    folder = PredictionsFolder(config.output)
    folder.refuse_unsafe(config.input)
    source = inputs.InputSource.from_table(config.input, listing)
    return _score_source(config, folder, source, time.monotonic() if started is None else started)


def check_before_work(config: ScoreConfig) -> tuple[PredictionsFolder, inputs.InputSource]:
    """The checks a run makes before anything is read or written (a dry run makes the same):
    the output's place and state, the input's kind, an image in a folder input.

    Raises:
        OutputExistsError, InputError: see `score`.
    """
    folder = PredictionsFolder(config.output)
    folder.refuse_unsafe(config.input)
    folder.refuse_existing(overwrite=config.overwrite, resume=config.resume)
    source = inputs.open_input(config.input, follow_symlinks=config.follow_symlinks)
    if source.kind == "folder":
        _refuse_empty_folder(source)
    return folder, source


def _refuse_empty_folder(source: inputs.InputSource) -> None:
    """InputError before any work when a folder holds no image (walks until the first one)."""
    probe = inputs.InputSource(source.location, source.kind, source.follow_symlinks)
    for _ in probe.chunks(chunk_rows=1):
        return
    inputs.check_not_empty(probe, 0)


def _score_source(config: ScoreConfig, folder: PredictionsFolder, source: inputs.InputSource, started: float) -> dict:
    """One run from checked input and output: lease, prepare, stream or plan and score, account."""
    from catdog.model.run_folder import describe_model
    from catdog.score.lease import OutputLease

    run_id = new_run_id()
    info = describe_model(config.model)
    _check_cluster(config, source)
    columns = config.output_columns(info)
    schema = predictions_schema(info.class_names, with_true_label=source.has_true_label, **columns)
    run_info = {
        "run_id": run_id, "started_at": now_iso(), "model": config.model, "model_id": info.model_id,
        "model_uri": config.model_uri,
        "class_names": list(info.class_names), "partition_by": config.partition_by,
        "with_true_label": source.has_true_label, "input": config.input,
        "input_canonical": inputs.canonical_location(config.input), "precision": config.precision,
        "catdog_version": catdog.__version__, **columns,
    }
    created = not folder.exists()
    with OutputLease.acquire(config.output, run_id) as lease:
        try:
            state = folder.prepare(overwrite=config.overwrite, resume=config.resume, run_info=run_info, schema=schema,
                                   input_moved=config.input_moved)
            folder.clear_listing()
            streaming = source.kind == "folder" and source.preloaded is None and not state.kept_files
            with tempfile.TemporaryDirectory(prefix="catdog-scoring-", dir=config.scratch_dir) as scratch:
                if streaming:  # a folder or prefix into a new or empty output: scored as it is listed
                    outcome = _stream(config, source, folder, info, run_id, schema)
                else:  # a resume, a manifest or a listing in memory: listed, planned, then scored
                    outcome = _plan_and_score(config, source, folder, info, run_id, schema, scratch, lease)
                counts = _account(folder, outcome, run_id, scratch)
        except ModelLoadError:
            lease.release()
            folder.discard_if_empty(created)  # no trace of a run that wrote no row
            raise
        folder.clear_todo()
        summary = _summary(config, run_info, schema, outcome, counts, state, started)
        lease.check()  # a run whose lease was taken over must not vouch for rows it no longer owns
        folder.write_success(summary)
    logger.info("Run %s done: %d rows (%d errors %s) in %.1f s, %.1f images/s", run_id, summary["rows_written"],
                summary["errors"], summary["errors_by_kind"], summary["wall_time_s"], summary["images_per_s"] or 0.0)
    return summary


def _summary(config: ScoreConfig, run_info: dict, schema: pa.Schema, outcome: _Outcome, counts: dict, state,
             started: float) -> dict:
    """The `_SUCCESS.json` of a run: what it was asked, what it found, what it wrote."""
    wall = time.monotonic() - started
    return {
        **run_info,
        "output": config.output,
        "files_listed": outcome.listed,
        "skipped_while_listing": outcome.skipped,
        **counts,
        "rows_scored_this_run": outcome.scored,
        "rows_from_earlier_runs": outcome.listed - outcome.scored,
        "rescored_changed_files": outcome.changed,
        "retried_transient_errors": outcome.retried,
        "rows_removed": outcome.removed,
        "quarantined_files": state.quarantined,
        "recovered_rewrites": state.recovered,
        "finished_at": now_iso(),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(outcome.scored / wall, 3) if wall > 0 else None,
        "predictors_peak": outcome.pool["peak"] if outcome.pool else 0,
        "predictor_pool": outcome.pool,
        "schema": {f.name: str(f.type) for f in schema},
    }


def _stream(config: ScoreConfig, source: inputs.InputSource, folder: PredictionsFolder, info, run_id: str,
            schema: pa.Schema) -> _Outcome:
    """Score while listing: the listing is the pipeline's source."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    logger.info("Run %s: scoring %s into %s as it is listed (%s, batch %d)", run_id, config.input, config.output,
                config.precision, config.effective_batch_size)
    folder.mark_partial()
    init_ray(config.ray_address)
    counter = progress.start_counter()
    rows = min(MAX_PATHS_PER_BLOCK, 4 * config.effective_batch_size)
    # The walk reads the driver's view of a local input; object stores, and local paths every node
    # mounts (--assume-shared-storage, the one way a cluster of several nodes takes them), are the
    # same from anywhere.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pinned = "://" not in source.location and not config.assume_shared_storage
    pool = run_pipeline(sources.ListingSource(source, config.output, rows, counter), folder, schema, config, info,
                        run_id, counter, inputs.CHUNK_ROWS, total_known=False,
                        read_args={"scheduling_strategy": here} if pinned else {})
    listed = folder.count_listed()  # the kept listing is the record; the counter only reports progress
    return _Outcome(listed=listed, scored=listed, skipped=ray.get(counter.totals.remote())["skipped"], pool=pool)


def _plan_and_score(config: ScoreConfig, source: inputs.InputSource, folder: PredictionsFolder, info, run_id: str,
                    schema: pa.Schema, scratch: str, lease) -> _Outcome:
    """List into `_listing/`, plan against the rows already written, score `_todo/`.

    Rows to replace (changed files, transient errors, and with --drop-unlisted the unlisted
    paths) stay in buckets on local disk, never in a set in this process.
    """
    listed_rows = 0
    for index, chunk in enumerate(source.chunks()):
        folder.write_listing_chunk(index, chunk)
        listed_rows += chunk.num_rows
    inputs.check_not_empty(source, listed_rows)
    rows_before = folder.count_rows()
    count = ledger.bucket_count(max(listed_rows, rows_before))
    order = source.schema.append(pa.field(ledger.ORDER_COLUMN, pa.int64()))
    listing = ledger.split(ledger.with_order(folder.iter_listing()), f"{scratch}/listing", count, order)
    identity = [inputs.PATH_COLUMN, inputs.SIZE_COLUMN, inputs.MODIFIED_COLUMN, "error"]
    done = ledger.split(folder.iter_rows(identity), f"{scratch}/done", count,
                        inputs.listing_schema(False).append(pa.field("error", pa.string())))
    unlisted = ledger.Buckets(f"{scratch}/unlisted", count, _PATHS)
    replaced = ledger.Buckets(f"{scratch}/replaced", count, _PATHS)

    def on_unlisted(paths: pa.Array) -> None:
        unlisted.add(pa.table({"path": paths}))
        if config.drop_unlisted:
            replaced.add(pa.table({"path": paths}))

    todo_files = iter(range(10**9))
    folder.clear_todo()
    plan = ledger.plan(listing, done, on_todo=lambda table: folder.write_todo(next(todo_files), table),
                       on_replaced=lambda paths: replaced.add(pa.table({"path": paths})), on_unlisted=on_unlisted)
    unlisted.flush()
    replaced.flush()
    outcome = _Outcome(listed=plan.listed, scored=plan.todo, changed=plan.changed, retried=plan.retried,
                       skipped={k: v for k, v in {**source.skipped, "duplicate_path": plan.repeated}.items() if v})
    _report_changed_input(plan, config)
    if config.drop_unlisted and rows_before and not plan.overlap:
        folder.clear_todo()
        raise CatdogError(
            f"--drop-unlisted: none of the {rows_before:,} rows in {config.output} is for a file listed in {config.input}"
            "; refusing to remove them all (a mistyped --input?). Nothing was changed")
    if replaced.rows or plan.todo:
        lease.check()
        folder.mark_partial()  # rows change from here on: partial until accounting passes
    outcome.removed = folder.remove_rows(replaced, run_id, schema, scratch)
    outcome.kept_unlisted = None if config.drop_unlisted else unlisted
    logger.info("Run %s: scoring %d of %d files from %s into %s (%s, batch %d)", run_id, plan.todo, plan.listed,
                config.input, config.output, config.precision, config.effective_batch_size)
    if plan.todo:
        init_ray(config.ray_address)
        rows = block_rows(plan.todo, config.effective_batch_size)
        outcome.pool = run_pipeline(sources.ChunkFilesSource(folder.todo_files(), folder.fs, rows), folder, schema,
                                    config, info, run_id, progress.start_counter(), plan.todo)
    return outcome


def _check_cluster(config: ScoreConfig, source: inputs.InputSource) -> None:
    """Refuse, before anything is written, what the Ray cluster cannot do as asked.

    Only a run that joins Ray (an address, a Ray already running here) or needs a GPU connects
    now; any other run starts its own one-node local Ray later, where neither question arises.
    """
    import ray

    from catdog.cluster.capacity import wait_for_gpus
    from catdog.cluster.checks import refuse_local_paths_on_cluster

    if not (config.use_gpu or config.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        return
    init_ray(config.ray_address)
    paths = {"--model": config.model, "--output": config.output}
    if source.kind == "folder":  # a manifest's rows name their own locations
        paths["--input"] = config.input
    refuse_local_paths_on_cluster(paths, config.assume_shared_storage)
    if config.use_gpu:
        from catdog.score.pipeline import PREDICTOR_CPUS

        wait_for_gpus(config.gpus_per_worker, PREDICTOR_CPUS, config.wait_for_workers_s)


def _account(folder: PredictionsFolder, outcome: _Outcome, run_id: str, scratch: str) -> dict:
    """Accounting; a late write of an interrupted run (every row scored again) is dropped first."""

    def check() -> dict:
        return _account_beside_driver(folder, outcome.kept_unlisted, outcome.listed, scratch)

    try:
        return check()
    except AccountingError as failed:
        if not failed.duplicates or not folder.drop_superseded_files(run_id, scratch):
            raise
        return check()


def _account_beside_driver(folder: PredictionsFolder, kept_unlisted, listed_rows: int, scratch: str) -> dict:
    """`PredictionsFolder.account` in a one-shot Ray task on this node when Ray runs, else here.

    The set work holds one bucket of paths (`catdog.score.ledger`); in a worker that exits afterwards,
    that bounded buffer never becomes the driver's: the driver's memory stays flat as the input
    grows (benchmarks/README.md, Huge inputs). Errors come back as the task raised them.
    """
    import ray

    if not ray.is_initialized():
        return _account_here(folder, kept_unlisted, listed_rows, scratch)
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # This node: a local output and the resume's scratch buckets are read where the driver wrote them.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_account_in_worker).options(scheduling_strategy=here)
    try:
        return ray.get(task.remote(folder.location, kept_unlisted, listed_rows, scratch))
    except RayTaskError as failed:
        if isinstance(failed.cause, Exception):
            raise failed.cause from None
        raise


def _account_in_worker(location: str, kept_unlisted, listed_rows: int, scratch: str) -> dict:
    # A one-shot process: the system allocator returns each bucket's pages at once, where
    # mimalloc's per-thread heaps would keep them until exit and add up to a higher peak.
    pa.set_memory_pool(pa.system_memory_pool())
    return _account_here(PredictionsFolder(location), kept_unlisted, listed_rows, scratch)


def _account_here(folder: PredictionsFolder, kept_unlisted, listed_rows: int, scratch: str) -> dict:
    return folder.account(kept_unlisted=kept_unlisted.tables() if kept_unlisted is not None else None,
                          listed_rows=listed_rows, scratch=scratch)


def _report_changed_input(plan: ledger.ResumeCounts, config: ScoreConfig) -> None:
    if plan.changed:
        logger.warning("--resume: %d files changed since they were scored (size or time); scoring them again",
                       plan.changed)
    if plan.retried:
        logger.info("--resume: %d rows had a read error that may pass (%s); scoring them again", plan.retried,
                    ", ".join(sorted(TRANSIENT_ERROR_KINDS)))
    if plan.unlisted:
        action = "removing their rows (--drop-unlisted)" if config.drop_unlisted else (
            "their rows are kept and left out of the check (pass --drop-unlisted to remove them)")
        logger.warning("--resume: %d paths with rows are no longer listed in %s; %s", plan.unlisted, config.input,
                       action)
