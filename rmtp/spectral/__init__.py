"""Random-matrix core: the Marchenko–Pastur law, its fit to weight spectra, and per-layer analysis.

- :mod:`rmtp.spectral.mp`: ``mp_pdf``, ``mp_cdf``, ``mp_quantile``, ``fit_mp`` → :class:`MPFit`,
  ``weight_matrix`` (pure math on arrays; what the RMT pruners use);
- :mod:`rmtp.spectral.tracy_widom`: the TW1 law for the optional edge margin;
- :mod:`rmtp.spectral.layers`: ``analyze_model`` → one :class:`LayerSpectrum` per matrix (and
  ``analyze_state_dict``, the same by state-dict key when no architecture is known);
- :mod:`rmtp.spectral.analysis`: ``analyze(source)`` → :class:`SpectrumReport` (``rmtp analyze-spectrum``).
- :mod:`rmtp.spectral.report`: a :class:`SpectrumReport` as a rich table, CSV and ESD plots.

The formulas, defaults and what is skipped are in ``docs/spectral.md``.
"""

from __future__ import annotations

from rmtp.spectral.layers import MIN_DIM, LayerSpectrum, analyze_model, analyze_state_dict
from rmtp.spectral.mp import MPFit, fit_mp, mp_cdf, mp_edges, mp_pdf, mp_quantile, tw_edge_margin, weight_matrix

__all__ = [
    "MIN_DIM", "LayerSpectrum", "MPFit", "analyze_model", "analyze_state_dict", "fit_mp", "mp_cdf", "mp_edges",
    "mp_pdf", "mp_quantile", "tw_edge_margin", "weight_matrix",
]
