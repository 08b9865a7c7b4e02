"""Evolution of learnable policies (NAMM, Cetin et al. 2024) with CMA-ES: resumable runs over
incremental stages, parallel evaluation through executors, a JSONL log and its plot.

    from kvpolicy.evolve import Evolution, EvolveConfig
    result = Evolution(EvolveConfig.from_file("examples/evolve_ci.json"), "runs/ci").run()
"""

from kvpolicy.evolve.config import EvolveConfig, ExecutorConfig, FitnessConfig, StageConfig
from kvpolicy.evolve.runner import Evolution, EvolutionResult

__all__ = ["Evolution", "EvolutionResult", "EvolveConfig", "ExecutorConfig", "FitnessConfig", "StageConfig"]
