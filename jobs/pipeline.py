"""The whole method as one resumable Ray job: collect -> reduce -> steer -> report.

Runs three ways:

    python -m jobs.pipeline configs/pipeline-organism.yaml                  # in-process ray.init()
    python -m jobs.pipeline configs/pipeline-organism.yaml --address auto   # a `ray start --head`
    ray job submit --working-dir . -- python -m jobs.pipeline configs/pipeline-organism.yaml

Re-running the same config resumes every stage where it stopped.
"""

from crossmodal.cli import run as main

if __name__ == "__main__":
    main()
