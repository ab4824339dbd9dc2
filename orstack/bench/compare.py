"""Is a difference real? Every model after the first, compared with the first on the same tasks
and the same text.

- Tasks: the accuracy difference with a 95% paired bootstrap interval (tasks resampled, seeded),
  McNemar's exact p-value, and how many tasks flipped each way; overall, per domain and, for
  rows annotated by cluster-failures, per cluster.
- Text (--ppl): the KL divergence of each model's next-token distributions from the first's,
  position by position on the --ppl-rule's scored tokens (what llama.cpp's --kl-divergence
  reports). The first model's log-probabilities are kept in a temporary file while the others
  run. KL needs one vocabulary and one tokenization: a model whose tokens or vocabulary width
  differ (a vocab-trimmed model gives the dropped tokens no probability at all, which makes
  KL infinite) gets "n/a" with the reason, never a number on a different support.
- Gates: --fail-under ACC and DOMAIN=ACC, --max-regression PTS at --alpha.

The math is orstack/stats.py; this module pairs rows and words the results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orstack import stats
from orstack.errors import BadInput

if TYPE_CHECKING:
    from orstack.backends.base import Backend
    from orstack.backends.perplexity import Window


# -- tasks ---------------------------------------------------------------------------------

def compare_pairs(reference: Sequence[float], other: Sequence[float], *, seed: int = 0,
                  n_resamples: int = stats.BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """One paired comparison: `reference[i]` and `other[i]` are the two models' verdicts on task i
    (1/0, or the share of correct samples when a task has several). `gained`/`lost` count the
    tasks that got better/worse, and p is the exact sign test on them: McNemar's exact test
    when every verdict is 1/0."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    gained, lost = int((b > a).sum()), int((b < a).sum())
    low, high = stats.paired_bootstrap(b - a, n_resamples=n_resamples, seed=seed)
    defined = a.size > 0
    return {"tasks": int(a.size), "reference_accuracy": float(a.mean()) if defined else None,
            "accuracy": float(b.mean()) if defined else None,
            "difference": float((b - a).mean()) if defined else None,
            "ci95": [low, high] if defined else [None, None],
            "p_value": stats.mcnemar_exact(gained, lost), "gained": gained, "lost": lost}


def _scored_by_id(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per task id: its first row (domain, cluster) and `verdict`, the share of its
    scored rows that are correct (rows sharing an id are samples of one task, as for pass@k)."""
    tasks: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("correct") is None:
            continue
        entry = tasks.setdefault(str(r["id"]), {"row": r, "n": 0, "right": 0})
        entry["n"] += 1
        entry["right"] += bool(r["correct"])
    return {k: {**e["row"], "verdict": e["right"] / e["n"]} for k, e in tasks.items()}


def compare_rows(reference: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], *,
                 seed: int = 0) -> dict[str, Any]:
    """A model's Result rows against the reference's, joined on task id (only tasks both
    scored): overall, then by domain (when the tasks have two or more) and by cluster."""
    ref = _scored_by_id(reference)
    pairs = [(ref[k], r) for k, r in _scored_by_id(rows).items() if k in ref]
    verdicts = lambda ps: ([a["verdict"] for a, _ in ps], [b["verdict"] for _, b in ps])  # noqa: E731
    result = compare_pairs(*verdicts(pairs), seed=seed)
    for field, name in (("domain", "by_domain"), ("cluster", "by_cluster")):
        groups: dict[str, list] = {}
        for a, b in pairs:
            value = a.get(field, b.get(field))
            if value is not None:
                groups.setdefault(str(value), []).append((a, b))
        if len(groups) > 1 or (field == "cluster" and groups):
            result[name] = {g: compare_pairs(*verdicts(ps), seed=seed) for g, ps in sorted(groups.items())}
            if field == "cluster":
                for g, ps in groups.items():
                    label = next((r.get("cluster_label") for pair in ps for r in pair if r.get("cluster_label")),
                                 None)
                    if label is not None:
                        result[name][g]["label"] = label
    return result


def comparisons(rows: Sequence[dict[str, Any]], models: Sequence[str], *, seed: int = 0,
                alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every model after the first against the first, on the tasks both scored; `significant`
    says McNemar's p is below `alpha`."""
    if len(models) < 2:
        return []
    by_model: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for r in rows:
        by_model.setdefault(str(r.get("model")), []).append(r)
    first = models[0]
    out = []
    for model in models[1:]:
        entry = {"model": model, "reference": first}
        if by_model[first] and by_model[model]:
            entry.update(compare_rows(by_model[first], by_model[model], seed=seed))
            entry["significant"] = entry["p_value"] < alpha
        out.append(entry)
    return out


# -- gates ---------------------------------------------------------------------------------

def parse_fail_under(specs: Sequence[str | float]) -> tuple[float | None, dict[str, float]]:
    """--fail-under values: ACC (every model's overall accuracy) or DOMAIN=ACC, ACC in [0, 1]."""
    overall: float | None = None
    domains: dict[str, float] = {}
    for spec in specs:
        text = str(spec).strip()
        domain, sep, value = text.rpartition("=")
        try:
            acc = float(value)
        except ValueError:
            acc = math.nan
        if not 0.0 <= acc <= 1.0 or (sep and not domain.strip()):
            raise BadInput(f"--fail-under: expected ACC or DOMAIN=ACC with ACC in [0, 1], got '{text}'")
        if not sep:
            if overall is not None:
                raise BadInput(f"--fail-under: the overall accuracy is given twice ({overall} and {acc})")
            overall = acc
        elif domain.strip() in domains:
            raise BadInput(f"--fail-under: domain '{domain.strip()}' is given twice")
        else:
            domains[domain.strip()] = acc
    return overall, domains


def check_gates(fail_under: Sequence[str | float], max_regression: float | None, alpha: float) -> None:
    """The gate options themselves, before anything is read."""
    parse_fail_under(fail_under)
    if max_regression is not None and not 0.0 <= max_regression <= 100.0:
        raise BadInput(f"--max-regression: expected accuracy points in [0, 100], got {max_regression}")
    if not 0.0 < alpha < 1.0:
        raise BadInput(f"--alpha: expected a significance level in (0, 1), got {alpha}")


def check_domains(domains: dict[str, float], rows: Sequence[dict[str, Any]], source: str) -> None:
    """A DOMAIN=ACC gate must name a domain some task has (a typo must not pass silently)."""
    present = {str(r["domain"]) for r in rows if r.get("domain") is not None}
    for domain in domains:
        if domain not in present:
            known = ", ".join(sorted(present)) or "none"
            raise BadInput(f"--fail-under {domain}={domains[domain]}: no task in {source} has domain '{domain}' "
                           f"(domains: {known})")


def gate_failures(summaries: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                  comparison: Sequence[dict[str, Any]], *, fail_under: Sequence[str | float],
                  max_regression: float | None, alpha: float) -> list[str]:
    """Why the accuracy gates failed (empty: passed). A model without an accuracy fails
    --fail-under; --max-regression trips when a model is more than PTS points below the first
    and McNemar's p is below alpha."""
    overall, domains = parse_fail_under(fail_under)
    failures = []
    if overall is not None:
        below = [f"{s['model']} {s['accuracy'] if s.get('accuracy') is None else round(s['accuracy'], 4)}"
                 for s in summaries if s.get("accuracy") is None or s["accuracy"] < overall]
        if below:
            failures.append(f"accuracy below --fail-under {overall}: {', '.join(below)}")
    for domain, threshold in domains.items():
        below = []
        for s in summaries:
            verdicts = [bool(r["correct"]) for r in rows if str(r.get("model")) == s["model"]
                        and r.get("correct") is not None and str(r.get("domain")) == domain]
            acc = sum(verdicts) / len(verdicts) if verdicts else None
            if acc is None or acc < threshold:
                below.append(f"{s['model']} {acc if acc is None else round(acc, 4)}")
        if below:
            failures.append(f"{domain} accuracy below --fail-under {domain}={threshold}: {', '.join(below)}")
    if max_regression is not None:
        worse = [c for c in comparison if c.get("difference") is not None
                 and -c["difference"] * 100 > max_regression and c["p_value"] < alpha]
        if worse:
            failures.append(f"more than {max_regression} points below {comparison[0]['reference']} "
                            f"(McNemar p < {alpha}): "
                            + ", ".join(f"{c['model']} {100 * c['difference']:+.1f} points, p={c['p_value']:.3g}"
                                        for c in worse))
    return failures


# -- text: KL divergence from the first model ------------------------------------------------

def _start_token(backend: Backend) -> int:
    """The token each backend's perplexity starts a document with, so KL is taken on the very
    tokens --ppl scored."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None:
        from orstack.backends.perplexity import prefix_token

        return prefix_token(tokenizer)
    return backend._prefix_token()


def kl_windows(backend: Backend, texts: Sequence[str], *, max_length: int, rule: str) -> list[Window]:
    """The windows the --ppl rule scores, tokenized by `backend`."""
    from orstack.backends.perplexity import llama_cpp_windows, rolling_windows

    prefix = _start_token(backend)
    texts = [t for t in texts if t]
    if rule == "rolling":
        return [w for t in texts for w in rolling_windows(backend.encode(t), prefix, max_length)]
    return llama_cpp_windows([prefix] + backend.encode("\n\n".join(texts)), prefix, max_length)


_ROWS = 256  # positions per float64 step: bounds the working memory at _ROWS x vocab x 8 bytes


def _scored_logprobs(backend: Backend, window: Window) -> np.ndarray:
    """float32 log-probabilities [n_scored, vocab] after each scored position (float32 on both
    sides, so a model against itself is exactly 0), a few hundred positions at a time (a
    2048-token window of a 49k vocabulary would be 0.8 GB in float64 at once)."""
    n_in = len(window.input_ids)
    logits = backend.logits(window.input_ids)[n_in - window.n_scored : n_in]
    out = np.empty(logits.shape, dtype=np.float32)
    for i in range(0, len(logits), _ROWS):
        out[i : i + _ROWS] = stats.log_softmax(logits[i : i + _ROWS])
    return out


class KLReference:
    """The first model's next-token log-probabilities on the --ppl windows, on disk in `directory`
    ([scored positions, vocab] float32: 4 bytes x vocab per token), and each later model measured
    against them while it is loaded."""

    def __init__(self, directory: str | Path, texts: Sequence[str], *, rule: str) -> None:
        self.path = Path(directory) / "reference-logprobs.npy"
        self.texts, self.rule = list(texts), rule
        self.max_length: int | None = None  # the reference's window length, kept for every model
        self.windows: list[Window] | None = None
        self.store: np.ndarray | None = None
        self.model: str | None = None
        self.missing: str | None = None  # why the reference has no distributions

    def measure(self, backend: Backend, max_length: int) -> dict[str, Any] | None:
        """The first call records `backend` as the reference (on windows of `max_length`; returns
        None); every later call returns the model's KL from it, or {"n/a": reason}."""
        from orstack.console import track

        first = self.model is None
        if first:
            self.model, self.max_length = backend.name, max_length
        if not callable(getattr(backend, "logits", None)):
            reason = f"{backend.name} gives no per-position logits"
            if first:
                self.missing = reason
            return None if first else {"n/a": reason}
        if self.missing is not None:
            return {"n/a": self.missing}
        windows = kl_windows(backend, self.texts, max_length=self.max_length, rule=self.rule)
        if first:
            self._record(backend, windows)
            return None
        context = backend.context_length()
        if context and context < self.max_length:
            return {"n/a": f"{backend.name}'s context of {context} tokens is shorter than the {self.max_length}-token "
                           f"windows {self.model} was measured on"}
        if windows != self.windows:
            return {"n/a": f"{backend.name}'s token ids for the --ppl text differ from {self.model}'s (another "
                           f"tokenizer or a trimmed vocabulary): KL needs one vocabulary"}
        kl, same_top, row = [], 0, 0
        for w in track(windows, "KL divergence", unit="windows"):
            q = _scored_logprobs(backend, w)
            if q.shape[1] != self.store.shape[1]:
                return {"n/a": f"{backend.name} has {q.shape[1]} tokens in its vocabulary, {self.model} "
                               f"{self.store.shape[1]} (KL needs one vocabulary)"}
            for i in range(0, len(q), _ROWS):
                qi = q[i : i + _ROWS]
                p = np.asarray(self.store[row + i : row + i + len(qi)])
                kl.append(stats.kl_divergence(p, qi))
                same_top += int((p.argmax(axis=1) == qi.argmax(axis=1)).sum())
            row += len(q)
        values = np.concatenate(kl)
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99)), "max": float(values.max()),
                "same_top": same_top / len(values), "positions": int(len(values))}

    def _record(self, backend: Backend, windows: list[Window]) -> None:
        from orstack.console import track

        if not windows:
            raise BadInput(f"--ppl: text too short to score under the {self.rule} rule with max length "
                           f"{self.max_length}")
        self.windows = windows
        total = sum(w.n_scored for w in windows)
        row = 0
        for w in track(windows, "KL reference", unit="windows"):
            p = _scored_logprobs(backend, w)
            if self.store is None:
                self.store = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                                       shape=(total, p.shape[1]))
            self.store[row : row + len(p)] = p
            row += len(p)
        self.store.flush()


# -- the report ----------------------------------------------------------------------------

def _pm(c: dict[str, Any]) -> str:
    """"+4.0 [-1.0, +9.0]": the difference and its interval, in accuracy points."""
    if c.get("difference") is None:
        return "-"
    low, high = c["ci95"]
    return f"{100 * c['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _row(name: str, c: dict[str, Any]) -> tuple[str, ...]:
    return (name, str(c["tasks"]), _pm(c), f"{c['p_value']:.3g}", f"+{c['gained']} -{c['lost']}")


def statistics_tables(comparison: Sequence[dict[str, Any]]) -> list:
    """Rich tables (narrow enough for 80 columns): per model its difference from the first with
    the 95% interval in accuracy points, McNemar's p and the flips (+ now right, - now wrong);
    then per domain and per cluster; then KL from the first model on the --ppl text."""
    from orstack.console import new_table

    if not comparison:
        return []
    first = Path(comparison[0]["reference"]).name or comparison[0]["reference"]
    tables = []
    with_tasks = [c for c in comparison if "tasks" in c]
    if with_tasks:
        tbl = new_table("model", "tasks", "Δ acc pts [95% CI]", "McNemar p", "flips",
                        title=f"vs {first} (paired)")
        for c in with_tasks:
            tbl.add_row(*_row(Path(c["model"]).name or c["model"], c))
        tables.append(tbl)
    for group, heading in (("by_domain", "domain"), ("by_cluster", "cluster")):
        grouped = [c for c in with_tasks if group in c]
        if not grouped:
            continue
        tbl = new_table(heading, "tasks", "Δ acc pts [95% CI]", "McNemar p", "flips",
                        title=f"vs {first} by {heading}")
        for c in grouped:
            if len(grouped) > 1:  # a heading row per model keeps the first column narrow
                tbl.add_row(Path(c["model"]).name or c["model"], "", "", "", "")
            for name, g in c[group].items():
                label = f"{name} {g['label']}" if g.get("label") else name
                label = label if len(label) <= 24 else label[:23] + "…"
                tbl.add_row(*_row(("  " if len(grouped) > 1 else "") + label, g))
        tables.append(tbl)
    with_kl = [c for c in comparison if "kl" in c]
    if with_kl:
        tbl = new_table("model", "KL mean", "median", "p99", "same top", title=f"KL from {first} (nats/token)")
        for c in with_kl:
            kl = c["kl"]
            name = Path(c["model"]).name or c["model"]
            if "n/a" in kl:
                tbl.add_row(name, "n/a", "-", "-", "-")
            else:
                tbl.add_row(name, f"{kl['mean']:.4g}", f"{kl['median']:.4g}", f"{kl['p99']:.4g}",
                            f"{100 * kl['same_top']:.1f}%")
        tables.append(tbl)
    return tables


def kl_notes(comparison: Sequence[dict[str, Any]]) -> list[str]:
    """Why a model's KL is n/a, one line each."""
    return [f"{c['model']}: KL n/a: {c['kl']['n/a']}" for c in comparison if "n/a" in c.get("kl", {})]
