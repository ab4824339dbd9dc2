"""Failure-targeted distillation: data from tiered teachers (`generate`) and student training (`orstack.train`)."""
