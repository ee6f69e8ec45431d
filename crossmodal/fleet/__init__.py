"""Running a stage on Ray: the session and its environment, actor pools, progress, fault points.

``RaySession`` (session.py) connects and shuts down; ``ActorFleet`` (pool.py) runs jobs on
replicas of a callable class; ``FaultPoint`` (faults.py) kills a process at a chosen event
to prove that resume loses nothing. Every stage driver uses these three and nothing else of
Ray's start-up.
"""

from crossmodal.fleet.faults import FaultPoint
from crossmodal.fleet.pool import ActorFleet, progress
from crossmodal.fleet.session import RaySession, set_ray_env

__all__ = ["ActorFleet", "FaultPoint", "RaySession", "progress", "set_ray_env"]
