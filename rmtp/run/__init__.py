"""Running a recipe: its schema and loading, the layer filter, the pipeline and its steps, what a
step writes, preflight checks, resume snapshots, and the run's device, precision, distributed,
out-of-memory and progress helpers.

See docs/architecture.md for the map of every package.
"""
