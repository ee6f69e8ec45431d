"""Where examples come from: one record format, sources behind ``open_source``, audio, languages."""

from crossmodal.data.sources import open_source

__all__ = ["open_source"]
