"""Scoring: a folder, prefix or manifest of images into a predictions folder, one row per file.

The route: `run` (listing, planning against the output, accounting), `config` (ScoreConfig),
`pipeline` (Ray Data: decode tasks, the `predictor` actor pool, Parquet), `sources` (where the
pipeline's paths come from), `predictions_folder` (the output's one owner: schema, layout, resume,
crash-safe rewrites, accounting), `ledger` (set work over paths, bucket by bucket), `lease` (one
writer per output), `progress` and `live_metrics` (what a running job tells), `dry_run` (the plan
without the work).

May import: `catdog.cluster`, `catdog.model`, `catdog.io`, `catdog.errors`, `catdog.process`.
"""
