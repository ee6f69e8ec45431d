"""The reduce job: selectivity, exact sets, roles and overlap of a collect store.

Runs three ways, like the collect job:

    python -m jobs.reduce results/organism.zarr                    # in-process ray.init()
    python -m jobs.reduce results/organism.zarr --address auto     # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.reduce results/organism.zarr

Re-running skips the passes already recorded in the store. ``crossmodal report STORE`` writes
the figures and summary of a reduced store.
"""

from crossmodal.cli import reduce as main

if __name__ == "__main__":
    main()
