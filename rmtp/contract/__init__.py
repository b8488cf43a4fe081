"""The plugin API a third party imports: the pruner and architecture contracts, the hooks, the
registry of saved types (replacement layers and forward-pass patches) and shared param types.

See docs/architecture.md for the map of every package.
"""
