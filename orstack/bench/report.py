"""The side-by-side report: per-model summaries, the comparison table, lineage, the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orstack.io.manifest import read_manifest

# (summary key path, label, format, higher is better)
METRICS = [
    (("accuracy",), "accuracy", "{:.3f}", True),
    (("cluster_accuracy",), "clusters", "{:.3f}", True),
    (("pass@1",), "pass@1", "{:.3f}", True),
    (("pass@5",), "pass@5", "{:.3f}", True),
    (("pass@10",), "pass@10", "{:.3f}", True),
    (("mean_output_tokens",), "output tokens (mean)", "{:.1f}", False),
    (("tasks_per_s",), "tasks/s", "{:.1f}", True),
    (("ppl_answers", "ppl"), "answer ppl", "{:.3f}", False),
    (("ppl", "ppl"), "perplexity", "{:.3f}", False),
    (("ppl", "bits_per_byte"), "bits/byte", "{:.4f}", False),
    (("speed", "load_s"), "load s", "{:.2f}", False),
    (("speed", "prefill_tok_s"), "prefill tok/s", "{:.0f}", True),
    (("speed", "decode_tok_s"), "decode tok/s", "{:.1f}", True),
    (("speed", "peak_rss_mb"), "peak RSS MB", "{:.0f}", False),
    (("size_mb",), "size MB", "{:.2f}", False),
]


def lineage(spec: str) -> list[dict[str, Any]]:
    """Where a model came from: the stages recorded in its manifest, oldest first. The
    manifest is a checkpoint directory's orstack.json, the `orstack.manifest` metadata key of
    a .gguf file, or for a .orz pack the packed directory's orstack.json followed by the
    packing."""
    manifest = model_manifest(Path(spec))
    if manifest is None:
        return []
    steps = [{"stage": s.get("stage"), "path": s.get("path"), "args": s.get("args", {})}
             for s in manifest.get("lineage", [])]
    steps.append({"stage": manifest.get("stage"), "path": str(spec), "args": manifest.get("args", {})})
    return steps


def model_manifest(path: Path) -> dict[str, Any] | None:
    """The orstack manifest a model carries, or None when it has none (or is not a local file)."""
    if path.is_dir():
        return read_manifest(path)
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from orstack.gguf.metadata import read_gguf_manifest

        return read_gguf_manifest(path)  # GGUFReader maps the file; only the header is read
    if suffix == ".orz":
        return _packed_manifest(path)
    return None


def _packed_manifest(path: Path) -> dict[str, Any]:
    """A .orz pack's history: the packed directory's own (its orstack.json, decoded alone with
    its SHA-256 checked), then the packing itself with the pack's config."""
    import json

    from orstack.errors import BadInput
    from orstack.io.manifest import MANIFEST
    from orstack.zstd_pack import Pack

    with Pack(path) as pack:
        config = pack.index.get("config", {})
        packed = pack.index.get("root") == "dir" and any(f["path"] == MANIFEST for f in pack.files)
        data = b"".join(pack.iter_file(MANIFEST)) if packed else None
    steps: list[dict[str, Any]] = []
    if data is not None:
        try:
            inner = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: the packed {MANIFEST} is not valid JSON ({e})") from None
        if isinstance(inner, dict):
            steps = [*inner.get("lineage", []), {"stage": inner.get("stage"), "path": None,
                                                  "args": inner.get("args", {})}]
    return {"stage": "zstd-pack", "args": config, "lineage": steps}


def lineage_line(steps: Sequence[dict[str, Any]]) -> str:
    return " -> ".join(str(s["stage"]) for s in steps) if steps else "(no orstack manifest)"


def _get(summary: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    value: Any = summary
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def group_rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[float | None], str]]:
    """(label, value per model, format) for every metric some model has, plus per-family
    and per-kind accuracy."""
    rows = []
    for keys, label, fmt, _ in METRICS:
        values = [_get(s, keys) for s in summaries]
        if any(v is not None for v in values):
            rows.append((label, values, fmt))
    for group in ("by_kind", "by_family"):
        names = sorted({k for s in summaries for k in s.get(group, {})})
        for name in names:
            values = [s.get(group, {}).get(name) for s in summaries]
            rows.append((f"  {group[3:]} {name}", values, "{:.3f}"))
    return rows


# Beyond this many models the table turns: one row per model, the headline metrics across.
MAX_MODEL_COLUMNS = 3
# The many-models table's columns, most telling first; those that do not fit the width are left
# out (the --summary JSON has them all). Accuracy deltas are in points: "+3.2" fits where
# "(+0.032)" does not.
HEADLINE = ["accuracy", "clusters", "pass@1", "answer ppl", "size MB", "decode tok/s", "perplexity",
            "bits/byte", "output tokens (mean)", "peak RSS MB", "tasks/s", "pass@5", "pass@10"]
SHORT = {"output tokens (mean)": "out tok", "decode tok/s": "tok/s", "peak RSS MB": "RSS MB",
         "answer ppl": "ans ppl", "perplexity": "ppl"}
POINTS = {"accuracy", "clusters", "pass@1", "pass@5", "pass@10"}


def _cell(values: list[float | None], i: int, fmt: str) -> str:
    """A value, with its delta to the first model's for every model after the first."""
    v = values[i]
    if v is None:
        return "-"
    if i == 0 or values[0] is None:
        return fmt.format(v)
    return f"{fmt.format(v)} ({'+' if v - values[0] >= 0 else '-'}{fmt.format(abs(v - values[0]))})"


def _short_cell(values: list[float | None], i: int, fmt: str, label: str) -> str:
    """A value and, for accuracies after the first model, its difference in points."""
    v = values[i]
    if v is None:
        return "-"
    if label not in POINTS or i == 0 or values[0] is None:
        return fmt.format(v)
    return f"{fmt.format(v)} {100 * (v - values[0]):+.1f}"


def comparison_table(summaries: Sequence[dict[str, Any]], width: int | None = None):  # noqa: ANN201 - rich Table
    """Metrics down and models across (with per-family accuracy) for a few models; for many,
    one row per model with as many headline metrics as fit in `width` columns (None: all).
    Deltas are against the first model."""
    from orstack.console import new_table

    names = [s["model"] for s in summaries]
    rows = group_rows(summaries)
    if len(summaries) <= MAX_MODEL_COLUMNS:
        tbl = new_table("metric", *names, title="orstack bench")
        for label, values, fmt in rows:
            tbl.add_row(label, *(_cell(values, i, fmt) for i in range(len(values))))
        return tbl
    present = {label: (values, fmt) for label, values, fmt in rows}
    headline = [label for label in HEADLINE if label in present]
    shown = [Path(n).name or n for n in names]
    for n_columns in range(len(headline), 0, -1):
        tbl = _row_per_model(shown, [(label, *present[label]) for label in headline[:n_columns]])
        if width is None or n_columns == 1 or _measure(tbl) <= width:
            break
    left_out = headline[n_columns:]
    notes = ["accuracy deltas in points against the first model"]
    if "clusters" in present:
        notes.append("clusters: tasks annotated with a failure cluster")
    if left_out:
        notes.append(f"not shown at this width: {', '.join(left_out)}")
    tbl.caption = "; ".join(notes)
    return tbl


def _row_per_model(names: list[str], columns: list[tuple[str, list[float | None], str]]):  # noqa: ANN202
    from rich import box

    from orstack.console import new_table

    tbl = new_table("model", *(SHORT.get(label, label) for label, _, _ in columns), title="orstack bench")
    tbl.box = box.SIMPLE_HEAD
    tbl.pad_edge = False
    for i, name in enumerate(names):
        tbl.add_row(name, *(_short_cell(values, i, fmt, label) for label, values, fmt in columns))
    return tbl


def _measure(tbl) -> int:  # noqa: ANN001 - rich Table
    """The width `tbl` needs to print without wrapping a cell."""
    from rich.console import Console

    console = Console(width=10_000)
    return console.measure(tbl).maximum


def plot_accuracy_vs_size(summaries: Sequence[dict[str, Any]], path: str | Path) -> None:
    """A PNG of task accuracy against size on disk, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orstack.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in summaries:
        size, acc = _get(s, ("size_mb",)), _get(s, ("accuracy",))
        if size is None or acc is None:
            continue
        ax.scatter([size], [acc])
        ax.annotate(Path(s["model"]).name or s["model"], (size, acc), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("orstack bench: accuracy vs size")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
