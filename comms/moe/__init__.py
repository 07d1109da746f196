"""MoE communication scheduling (FSMoE): expert-parallel groups, overlapped all-to-all
(flat or hierarchical), the co-scheduled chunk pipeline, gradient partitions in its gaps,
and the profiler + makespan model that picks the schedule."""
from comms.moe.a2a import EPGroups, Exchanger, all_to_all, build_ep_groups
from comms.moe.perfmodel import Cost, LayerShape, Profile, Schedule, choose, gpu_cluster_profile, measure, sequential, simulate
from comms.moe.pipeline import Plan, run
from comms.moe.reducer import GradReducer
from comms.moe.scheduler import MoEScheduler

__all__ = ["EPGroups", "Exchanger", "all_to_all", "build_ep_groups", "Cost", "LayerShape", "Profile", "Schedule",
           "choose", "gpu_cluster_profile", "measure", "sequential", "simulate", "Plan", "run", "GradReducer", "MoEScheduler"]
