"""Runs: a config through the models to `submission.csv` and back again.

`pipeline` (the run's steps: `predict`, `run_model`, `run_ensemble`), `notebooks` (the five notebooks by papermill),
`outputs` (what a run writes: submission, metrics, manifest; `references/`), `compare` (two runs side by side),
`history` (the index of every run), `sweep/` (a config over a grid of settings).
"""
