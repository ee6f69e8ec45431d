"""Stage 2, reduce: selectivity, exact sets, roles, overlap and modality passes over a store."""
