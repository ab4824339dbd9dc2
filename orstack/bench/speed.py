"""`--speed`: load time, prefill and decode tokens/s (median of several runs), peak RSS, size.

A backend may time prefill and decode itself (`speed_sample(prompt_tokens, new_tokens)`
returning seconds for each, EOS ignored); otherwise they are timed through `generate`:
a one-token generation is the prefill, and the extra tokens of a longer one are decode.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from orstack.backends.base import Backend

FILLER = "The quick brown fox jumps over the lazy dog. " * 64


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MB."""
    value = _status_mb("VmHWM:")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    """Resident memory of this process now, in MB (Linux)."""
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_speed(backend: Backend, *, runs: int = 5, prompt_tokens: int = 128, new_tokens: int = 32,
                  max_positions: int | None = None) -> dict[str, float]:
    """Median prefill and decode rates over `runs` runs (after one warm-up run)."""
    if max_positions:  # stay inside the model's context
        prompt_tokens = min(prompt_tokens, max_positions // 2)
        new_tokens = min(new_tokens, max_positions - prompt_tokens - 1)
    sample = getattr(backend, "speed_sample", None) or _generic_sampler(backend)
    sample(prompt_tokens, new_tokens)
    prefill, decode = [], []
    for _ in range(runs):
        p_seconds, d_seconds, n_prompt, n_new = _as_counts(sample(prompt_tokens, new_tokens), prompt_tokens,
                                                           new_tokens)
        prefill.append(n_prompt / p_seconds)
        if n_new > 0 and d_seconds > 0:
            decode.append(n_new / d_seconds)
    return {"prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode) if decode else float("nan"),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs}


def _as_counts(sample: tuple, prompt_tokens: int, new_tokens: int) -> tuple[float, float, int, int]:
    if len(sample) == 2:
        return sample[0], sample[1], prompt_tokens, new_tokens
    return sample  # type: ignore[return-value]


def _generic_sampler(backend: Backend):  # noqa: ANN202
    words = FILLER.split()

    def sample(prompt_tokens: int, new_tokens: int) -> tuple[float, float, int, int]:
        prompt = " ".join(words[: max(prompt_tokens // 2, 1)])  # about two tokens a word in small vocabularies
        began = time.perf_counter()
        first = backend.generate([prompt], max_new_tokens=1, stop=[])[0]
        t_first = time.perf_counter() - began
        began = time.perf_counter()
        full = backend.generate([prompt], max_new_tokens=new_tokens + 1, stop=[])[0]
        t_full = time.perf_counter() - began
        return t_first, max(t_full - t_first, 1e-9), first.prompt_tokens, full.output_tokens - 1

    return sample
