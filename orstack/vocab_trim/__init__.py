"""vocab-trim: shrink a byte-level BPE model's vocabulary to the tokens a corpus uses.

    from orstack.vocab_trim import VocabTrimConfig, run
    run("model", "trimmed", VocabTrimConfig(corpus=["corpus.txt"]), Runtime())
"""

from orstack.vocab_trim.stage import VocabTrimResult, run
from orstack.vocab_trim.trim import TrimResult, VocabTrimConfig, plan_trim, vocab_trim

__all__ = ["TrimResult", "VocabTrimConfig", "VocabTrimResult", "plan_trim", "run", "vocab_trim"]
