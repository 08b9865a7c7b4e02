"""Build the workload a config names, in whichever process evaluates (workers build their own)."""

from __future__ import annotations

from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.jobs import Workload


def build_workload(config: EvolveConfig) -> Workload:
    if config.workload == "quadratic":
        from kvpolicy.evolve.quadratic import QuadraticWorkload

        return QuadraticWorkload(config.policy)
    from kvpolicy.evolve.hf_workload import HfWorkload

    return HfWorkload(config)
