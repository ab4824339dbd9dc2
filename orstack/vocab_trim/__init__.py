"""vocab-trim: shrink a byte-level BPE model's vocabulary to the tokens a corpus uses."""

from orstack.vocab_trim.trim import TrimResult, VocabTrimConfig, plan_trim, vocab_trim

__all__ = ["TrimResult", "VocabTrimConfig", "plan_trim", "vocab_trim"]
