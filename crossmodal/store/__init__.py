"""The Zarr store of a run: names, layout and writes, the writer lock, verification, the reader."""
