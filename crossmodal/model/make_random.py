"""Command line: write a model directory with SeamlessM4T v2 large's shapes and random weights.

    python -m crossmodal.model.make_random results/random-large
    python -m crossmodal.model.make_random /tmp/random-2layers --decoder-layers 2

The directory holds the config, the generation config with the real language-tag ids, the
real-vocabulary processor and a seed (no weights: they are drawn on load), so a collect
config can name it as ``model:`` (configs/large-shapes.yaml does).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from crossmodal.model.load import write_random_model_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crossmodal.model.make_random")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    for part in ("encoder", "decoder", "speech-encoder"):
        parser.add_argument(f"--{part}-layers", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {
        f"{part}_layers": getattr(args, f"{part}_layers")
        for part in ("encoder", "decoder", "speech_encoder")
        if getattr(args, f"{part}_layers") is not None
    }
    path = write_random_model_dir(args.out_dir, seed=args.seed, **overrides)
    print(f"wrote {path} (random weights, seed {args.seed}, overrides {overrides or 'none'})")


if __name__ == "__main__":
    main()
