"""Reinforcement learning with verifiable rewards (GRPO through trl): `run(source, output, RLConfig, runtime)`."""

from orstack.rl.grpo import RLConfig, RLResult, run
from orstack.rl.rewards import RewardConfig

__all__ = ["RLConfig", "RLResult", "RewardConfig", "run"]
