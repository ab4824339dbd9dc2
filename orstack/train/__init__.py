"""Training shared by `distill train` and `rl`: SFT with prompt masking, LoRA, logit distillation."""
