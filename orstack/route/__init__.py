"""Calibrated confidence routing: answer with the fast base when it is confidently right,
switch to base + a domain modifier (LoRA) or a bigger model when it is not."""
