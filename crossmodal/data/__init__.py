"""Where examples come from: one record format, sources behind ``open_source``, audio, languages."""
