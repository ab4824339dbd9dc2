"""Training machinery shared by the stages: the one loop (loop.py), SFT with prompt masking and logit
distillation (sft.py, data.py, losses.py), LoRA (lora.py), and rank-0 logging under torchrun
(distributed.py)."""
