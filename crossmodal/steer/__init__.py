"""Stage 3, steer: the intervention grid, its workers, output-language ID and metrics."""
