"""Reading and writing models and folders: the saved folder format (save/load), weight files,
the output folder's lock and staging, safe overwrites, atomic writes and the safe YAML loader.

See docs/architecture.md for the map of every package.
"""
