"""Stage 2, reduce: selectivity, exact sets, roles, overlap and modality passes over a store.

One module per pass (``selectivity``, ``exact``, ``sets``, ``modality``), run in that order
by ``driver``; ``selection``, ``roles`` and ``overlap`` are the analyses the passes apply
(pure functions of xarray objects), ``labels`` the store labels the passes share.
"""
