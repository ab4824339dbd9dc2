"""Reinforcement learning with verifiable rewards (GRPO through trl)."""
