"""Closeness to the dense model, measured, budgeted and restored: top-1 agreement and KL on
calibration images, accuracy budgets, layer-by-layer fitting, block-wise reconstruction and
evaluation without labels.

See docs/architecture.md for the map of every package.
"""
