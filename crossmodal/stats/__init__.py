"""Mergeable per-unit statistics: the running state, its CPU kernel, and what it finalizes to."""
