"""Reports and rendering: the report records every step returns (records) and their rich tables
(render).

See docs/architecture.md for the map of every package.
"""
