"""The collect job: validate a config, plan, and collect statistics with Ray actors.

Runs three ways (each tested in tests/test_collect.py):

    python -m jobs.collect configs/organism.yaml                   # in-process ray.init()
    python -m jobs.collect configs/organism.yaml --address auto    # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.collect configs/organism.yaml

``--dry-run`` prints the plan (work units, examples, units, estimated store size) and stops.
"""

from crossmodal.cli import collect as main

if __name__ == "__main__":
    main()
