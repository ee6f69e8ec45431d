"""The steer job: validate a grid config, then run its cells on Ray actors (resumable).

Runs three ways:

    python -m jobs.steer configs/steer-organism.yaml                  # in-process ray.init()
    python -m jobs.steer configs/steer-organism.yaml --address auto   # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.steer configs/steer-organism.yaml

``--dry-run`` prints the grid (cells, tasks, generations) and stops. Re-running the same
config skips the cells whose results are already in the output directory.
"""

from crossmodal.cli import steer as main

if __name__ == "__main__":
    main()
