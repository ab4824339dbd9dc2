"""The router: features -> classifier (logistic regression or a small MLP, chosen by held-out
log-loss) -> Platt calibration -> threshold. Stored as JSON + safetensors, never pickle."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from orstack.errors import BadInput
from orstack.route.calibration import Platt, calibration_report, chance_ece, ece, log_loss, sigmoid
from orstack.route.features import Featurizer
from orstack.stats import bootstrap_interval

ROUTER_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


@dataclass
class RouterConfig:
    """Everything `route train` needs to make a router again: its inputs and its choices."""

    embedder: str = "tfidf"
    svd_dims: int = 16
    threshold: float = 0.8
    optimize: bool = False
    cost_weight: float = 0.2
    calib_fraction: float = 0.25
    test_fraction: float = 0.2
    hidden: int = 32
    max_ece: float | None = 0.05  # the gate: calibrated ECE on the test split (the seed's ECE < 0.05); None: off
    # ... or within what a calibrated router shows on the test split's size (calibration.chance_ece):
    # on a few dozen rows a fixed 0.05 fails nearly every calibrated router. False: max_ece alone.
    ece_chance: bool = True
    cost: str = "tokens"  # what a path costs in the sweep: "tokens" (prompt + output, reproducible) or "latency"
    seed: int = 0
    results: str | None = None  # bench Result rows of the base (fast) model
    results_accurate: str | None = None  # the accurate path's rows on the same tasks (for the sweep)


@dataclass
class Classifier:
    """A feed-forward classifier as plain arrays: ReLU hidden layers, sigmoid output."""

    kind: str
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.logits(x))


MIN_ROWS = 20  # below this the train/calibration/test splits are too small to mean anything


def balanced_weights(y: np.ndarray) -> np.ndarray:
    positive = max(y.mean(), 1e-6)
    return np.where(y == 1, 0.5 / positive, 0.5 / max(1 - positive, 1e-6))


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int) -> Classifier:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed).fit(x, y)
    return Classifier("logistic", [model.coef_.T.copy()], [model.intercept_.copy()])


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, hidden: int) -> Classifier:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-2, max_iter=600, random_state=seed)
    with warnings.catch_warnings():
        # a fixed iteration budget keeps training time bounded; selection by log-loss judges the result
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=balanced_weights(y))
    return Classifier("mlp", [w.copy() for w in model.coefs_], [b.copy() for b in model.intercepts_])


def split_indices(n: int, calib_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_calib = int(round(n * test_fraction)), int(round(n * calib_fraction))
    return order[n_test + n_calib:], order[n_test:n_test + n_calib], order[:n_test]


@dataclass
class Router:
    config: RouterConfig
    featurizer: Featurizer
    classifier: Classifier
    platt: Platt
    threshold: float
    base: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, rows: list[dict]) -> np.ndarray:
        """Calibrated P(the base answer is correct) per row."""
        return self.platt(self.classifier.predict(self.featurizer.transform(rows)))

    def decide(self, row: dict) -> tuple[float, bool, float]:
        """(p_base_ok, use the accurate path?, decision latency in ms) for one result row."""
        start = time.perf_counter()
        p = float(self.predict([row])[0])
        return p, p < self.threshold, (time.perf_counter() - start) * 1000

    def save(self, out: Path) -> None:
        from safetensors.numpy import save_file

        arrays = dict(self.featurizer.arrays())
        for i, (w, b) in enumerate(zip(self.classifier.weights, self.classifier.biases)):
            arrays[f"classifier.{i}.weight"], arrays[f"classifier.{i}.bias"] = w, b
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()},
                  str(out / WEIGHTS_FILE))
        spec = {"config": asdict(self.config), "featurizer": self.featurizer.config(),
                "classifier": self.classifier.kind, "layers": len(self.classifier.weights),
                "platt": {"a": self.platt.a, "b": self.platt.b}, "threshold": self.threshold, "base": self.base}
        (out / ROUTER_FILE).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """A router directory written by `save`; anything missing, truncated or malformed is
        BadInput naming the file and the field."""
        path = Path(path)
        if not (path / ROUTER_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise BadInput(f"{path}: not a router directory (no {ROUTER_FILE} / {WEIGHTS_FILE})")
        spec = _read_spec(path / ROUTER_FILE)
        arrays = _read_arrays(path / WEIGHTS_FILE)
        where = path / WEIGHTS_FILE
        layers = spec["layers"]
        names = [f"classifier.{i}.{part}" for i in range(layers) for part in ("weight", "bias")]
        names += ["featurizer.mean", "featurizer.scale"]
        if spec["featurizer"]["embedder"] == "tfidf":
            names += ["featurizer.tfidf_idf", "featurizer.svd_components"]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise BadInput(f"{where}: tensor '{missing[0]}' is missing")
        classifier = Classifier(spec["classifier"], [arrays[f"classifier.{i}.weight"] for i in range(layers)],
                                [arrays[f"classifier.{i}.bias"] for i in range(layers)])
        _check_shapes(classifier, arrays, where)
        _check_featurizer(spec["featurizer"], arrays, where)
        from orstack.io.manifest import read_manifest

        manifest = read_manifest(path) or {}
        return cls(RouterConfig(**spec["config"]), Featurizer.restore(spec["featurizer"], arrays), classifier,
                   Platt(**spec["platt"]), spec["threshold"], spec.get("base") or {}, manifest.get("metrics", {}))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_spec(file: Path) -> dict[str, Any]:
    """router.json, with the type of every field the loader uses checked."""
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{file}: not valid JSON (line {e.lineno}: {e.msg}); is the router file truncated?") from None
    except UnicodeDecodeError:
        raise BadInput(f"{file}: not UTF-8 text") from None
    if not isinstance(spec, dict):
        raise BadInput(f"{file}: expected a JSON object")

    def need(obj: dict, key: str, ok, expected: str, prefix: str = "") -> Any:  # noqa: ANN001
        if key not in obj:
            raise BadInput(f"{file}: field '{prefix}{key}' is missing")
        if not ok(obj[key]):
            raise BadInput(f"{file}: field '{prefix}{key}' must be {expected}, got {json.dumps(obj[key])[:40]}")
        return obj[key]

    is_dict = lambda v: isinstance(v, dict)  # noqa: E731
    config = need(spec, "config", is_dict, "an object")
    known = {f.name for f in fields(RouterConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise BadInput(f"{file}: field 'config.{unknown[0]}' is not a router setting")
    featurizer = need(spec, "featurizer", is_dict, "an object")
    need(featurizer, "embedder", lambda v: isinstance(v, str), "a string", "featurizer.")
    need(featurizer, "svd_dims", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer",
         "featurizer.")
    need(featurizer, "domains", lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v),
         "a list of strings", "featurizer.")
    if featurizer["embedder"] == "tfidf":
        need(featurizer, "tfidf_vocabulary", lambda v: isinstance(v, dict) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v.values()), "an object of integers",
             "featurizer.")
    need(spec, "classifier", lambda v: v in ("logistic", "mlp"), "'logistic' or 'mlp'")
    need(spec, "layers", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    platt = need(spec, "platt", is_dict, "an object")
    need(platt, "a", _is_number, "a number", "platt.")
    need(platt, "b", _is_number, "a number", "platt.")
    need(spec, "threshold", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    if spec.get("base") is not None:
        need(spec, "base", is_dict, "an object")
    return spec


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, ValueError, OSError) as e:
        raise BadInput(f"{file}: not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None


def _check_featurizer(featurizer: dict[str, Any], arrays: dict[str, np.ndarray], where: Path) -> None:
    """The stored feature width must be what the featuriser produces (signals, domains, embedding)."""
    from orstack.route.features import N_SIGNALS

    embedder = featurizer["embedder"]
    if embedder == "tfidf":
        vocab = len(featurizer["tfidf_vocabulary"])
        svd, idf = arrays["featurizer.svd_components"], arrays["featurizer.tfidf_idf"]
        if idf.shape != (vocab,) or svd.ndim != 2 or svd.shape[1] != vocab:
            raise BadInput(f"{where}: tensors 'featurizer.tfidf_idf' / 'featurizer.svd_components' do not match "
                           f"the {vocab}-entry tf-idf vocabulary")
        embedding = svd.shape[0]
    elif embedder == "none":
        embedding = 0
    else:
        return  # a sentence-transformers embedding: its width is known once the embedder loads
    expected = N_SIGNALS + len(featurizer["domains"]) + embedding
    if arrays["featurizer.mean"].shape != (expected,):
        raise BadInput(f"{where}: tensor 'featurizer.mean' has shape {list(arrays['featurizer.mean'].shape)}, "
                       f"expected [{expected}] (signals, domains, embedding)")


def _check_shapes(classifier: Classifier, arrays: dict[str, np.ndarray], where: Path) -> None:
    """Each layer's weight must take the previous layer's output; the first takes the features."""
    width = arrays["featurizer.mean"].shape[-1] if arrays["featurizer.mean"].ndim == 1 else -1
    if width < 0 or arrays["featurizer.scale"].shape != (width,):
        raise BadInput(f"{where}: tensors 'featurizer.mean' and 'featurizer.scale' must be vectors of one length")
    for i, (w, b) in enumerate(zip(classifier.weights, classifier.biases)):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise BadInput(f"{where}: tensor 'classifier.{i}.weight' has shape {list(w.shape)}, "
                           f"expected [{width}, n] with a bias of n")
        width = w.shape[1]
    if width != 1:
        raise BadInput(f"{where}: the last classifier layer has {width} outputs, expected 1")


def labels(rows: list[dict]) -> np.ndarray:
    return np.array([1.0 if r.get("correct") else 0.0 for r in rows])


def train_router(rows: list[dict], config: RouterConfig) -> Router:
    """Fit featuriser and both classifiers on the train split, calibrate each on the calibration
    split, keep the one with the lower calibrated log-loss there; report on the test split."""
    y = labels(rows)
    if len(rows) < MIN_ROWS:
        raise BadInput(f"route train needs at least {MIN_ROWS} result rows, got {len(rows)}")
    if y.min() == y.max():
        raise BadInput("every result row has the same `correct` value: there is nothing to route on")
    train, calib, test = split_indices(len(rows), config.calib_fraction, config.test_fraction, config.seed)
    pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
    featurizer = Featurizer(embedder=config.embedder, svd_dims=config.svd_dims).fit(pick(train))
    x = featurizer.transform(rows)
    candidates = [fit_logistic(x[train], y[train], config.seed),
                  fit_mlp(x[train], y[train], config.seed, config.hidden)]
    scored = []
    for clf in candidates:
        raw = clf.predict(x[calib])
        platt = Platt.fit(y[calib], raw)
        scored.append((log_loss(y[calib], platt(raw)), clf, platt))
    scored.sort(key=lambda item: item[0])
    _, classifier, platt = scored[0]
    raw_test = classifier.predict(x[test])
    test_report = calibration_report(y[test], raw_test, platt(raw_test))
    calibrated_test = platt(raw_test)
    test_report["ece_after_ci95"] = list(bootstrap_interval(
        lambda idx: ece(y[test][idx], calibrated_test[idx]), len(test), n_resamples=1000, seed=config.seed))
    test_report["ece_after_chance95"] = chance_ece(calibrated_test, seed=config.seed)
    metrics = {
        "model_selection": {clf.kind: loss for loss, clf, _ in scored},
        "chosen": classifier.kind,
        "rows": {"train": len(train), "calibration": len(calib), "test": len(test)},
        "calibration_split": calibration_report(y[calib], classifier.predict(x[calib]),
                                                platt(classifier.predict(x[calib]))),
        "test_split": test_report,
        "test_split_15_bins": calibration_report(y[test], raw_test, platt(raw_test), bins=15),
        "base_accuracy": float(y.mean()),
    }
    return Router(config, featurizer, classifier, platt, config.threshold, metrics=metrics)


def base_identity(rows: list[dict], where: str) -> dict[str, Any]:
    """The base model the results came from (path and weights digest when it is on disk)."""
    from orstack.io.manifest import weights_digest

    models = sorted({str(r.get("model")) for r in rows if r.get("model") is not None})
    if len(models) > 1:
        raise BadInput(f"{where}: results from several models ({', '.join(models[:3])}); give one model's results")
    if not models:
        return {}
    path = Path(models[0])
    return {"model": models[0], "sha256": weights_digest(path) if path.exists() else None}


def join_accurate(rows: list[dict], accurate: list[dict], where: str) -> list[dict]:
    by_id = {r.get("id"): r for r in accurate}
    missing = [r.get("id") for r in rows if r.get("id") not in by_id]
    if missing:
        raise BadInput(f"{where}: no accurate-path result for {len(missing)} ids (first: {missing[0]!r})")
    return [by_id[r.get("id")] for r in rows]


COSTS = ("tokens", "latency")


def row_cost(row: dict, cost: str = "tokens") -> float:
    """What answering one row cost: the tokens the model read and wrote (the same on every
    rerun), or the measured wall time (latency_ms, which varies with the machine and its load)."""
    if cost == "latency":
        return float(row.get("latency_ms") or 0.0)
    return float((row.get("prompt_tokens") or 0) + (row.get("output_tokens") or 0))


def outcome_for(router: Router, rows: list[dict], accurate: list[dict], cost: str | None = None):
    from orstack.route.sweep import Outcome

    cost = cost or router.config.cost
    fast_cost = np.array([row_cost(r, cost) for r in rows])
    strong_cost = np.array([row_cost(r, cost) for r in accurate])
    return Outcome(router.predict(rows), labels(rows), labels(accurate), fast_cost, strong_cost)


def heldout_indices(n: int, config: RouterConfig) -> np.ndarray:
    """The test split of `train_router` (rows it neither fitted nor calibrated on)."""
    return split_indices(n, config.calib_fraction, config.test_fraction, config.seed)[2]


SWEEP_THRESHOLDS = np.round(np.arange(0.70, 0.9001, 0.02), 2)


def optimise_threshold(router: Router, rows: list[dict], accurate: list[dict]) -> list[dict]:
    """Sweep 0.70-0.90 on the held-out (test) split only, and with --optimize keep the best
    quality-per-cost score: a threshold chosen on the rows the classifier was fitted on would
    flatter it. The test split's size is in router.metrics["sweep_rows"]."""
    from orstack.route.sweep import sweep

    test = heldout_indices(len(rows), router.config)
    outcome = outcome_for(router, [rows[i] for i in test], [accurate[i] for i in test])
    table = sweep(outcome, SWEEP_THRESHOLDS, router.config.cost_weight)
    if router.config.optimize:
        router.threshold = max(table, key=lambda row: row["score"])["threshold"]
    router.metrics["sweep_rows"] = len(test)
    router.metrics["routing"] = routing_intervals(outcome, router.threshold, router.config.seed)
    return table


def routing_intervals(outcome, threshold: float, seed: int, n_resamples: int = 1000) -> dict:  # noqa: ANN001
    """APGR and the accuracy at `threshold` on the held-out outcome, each with a 95% bootstrap
    interval over its rows (seeded)."""
    from orstack.route.sweep import Outcome, accuracy_at_threshold, apgr
    from orstack.stats import bootstrap_interval

    def subset(idx: np.ndarray) -> Outcome:
        return Outcome(outcome.p_fast_ok[idx], outcome.fast_correct[idx], outcome.strong_correct[idx],
                       outcome.fast_cost[idx], outcome.strong_cost[idx])

    def apgr_of(idx: np.ndarray) -> float:
        o = subset(idx)
        return apgr(o) if o.strong_correct.mean() > o.fast_correct.mean() else float("nan")  # no gap, no PGR

    n = len(outcome.p_fast_ok)
    accuracy = accuracy_at_threshold(outcome, threshold)[0]
    gap = outcome.strong_correct.mean() > outcome.fast_correct.mean()
    return {
        "rows": n, "threshold": threshold,
        "accuracy": accuracy,
        "accuracy_ci95": list(bootstrap_interval(lambda idx: accuracy_at_threshold(subset(idx), threshold)[0], n,
                                                 n_resamples=n_resamples, seed=seed)),
        "apgr": apgr(outcome) if gap else None,
        "apgr_ci95": list(bootstrap_interval(apgr_of, n, n_resamples=n_resamples, seed=seed)) if gap else None,
    }
