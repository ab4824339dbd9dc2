"""Failure-targeted distillation: data from tiered teachers (`run_generate`) and student training
(`run_train`, on orstack.train)."""

from orstack.distill.generate import GenerateConfig, GenerateResult, run_generate
from orstack.distill.train import DistillTrainConfig, DistillTrainResult, run_train

__all__ = ["DistillTrainConfig", "DistillTrainResult", "GenerateConfig", "GenerateResult", "run_generate", "run_train"]
