#!/usr/bin/env python3
"""The figures docs/real-model.md asks of a run of examples/real-model.mk, as Markdown.

    python examples/real_report.py --out real-out > real-out/report.md

Reads what the run wrote: times.tsv (wall time, peak RSS per target), base-a.jsonl (the
base's half-A results), final-results.jsonl and summary.json (every artefact on half B),
route-summary.json, rl/orstack.json. Failing cells are the (family, level) cells where the
base answers fewer than half of half A right: chosen on half A, judged on half B.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

FAILING_BELOW = 0.5


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cell(row: dict) -> tuple[str, int]:
    return row.get("family"), row.get("level")


def accuracy(rows: list[dict]) -> float | None:
    scored = [r for r in rows if r.get("correct") is not None]
    return sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def short(model: str, out: Path) -> str:
    path = Path(model)
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return "base" if "smollm2" in model else path.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out = args.out
    lines: list[str] = []
    say = lines.append

    if (out / "times.tsv").is_file():
        say("## Time per stage\n\nWall time depends on the machine's load; CPU time (user + system, all threads) "
            "much less. A stage run again (after a gate stopped it, or with other settings) shows its last "
            "run; the earlier attempts are listed below the table.\n\n"
            "| target | wall s | CPU s | peak RSS MB |\n|---|---:|---:|---:|")
        runs, status = [], 0
        for line in (out / "times.tsv").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 5 and parts[0].replace(".", "", 1).isdigit():
                runs.append((parts[4], float(parts[0]), float(parts[2]) + float(parts[3]), int(parts[1]), status))
                status = 0
            elif line.startswith("Command exited with non-zero status"):
                status = int(line.split()[-1])
        last = {stage: i for i, (stage, *_, code) in enumerate(runs) if code == 0}
        total = cpu_total = 0.0
        for stage, i in sorted(last.items(), key=lambda kv: kv[1]):
            _, wall, cpu, rss, _ = runs[i]
            total, cpu_total = total + wall, cpu_total + cpu
            say(f"| {stage} | {wall:,.0f} | {cpu:,.0f} | {rss / 1024:,.0f} |")
        say(f"| **all stages** | **{total:,.0f}** | **{cpu_total:,.0f}** | |\n")
        earlier = [(i, r) for i, r in enumerate(runs) if last.get(r[0]) != i]
        if earlier:
            say("Earlier attempts: " + "; ".join(
                f"{stage} {wall:,.0f} s wall ({'exit ' + str(code) if code else 'run again'})"
                for _, (stage, wall, _, _, code) in earlier) + ".\n")

    base_a = read_jsonl(out / "base-a.jsonl")
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in base_a:
        by_cell[cell(r)].append(r)
    failing = {c for c, rows in by_cell.items() if (accuracy(rows) or 0.0) < FAILING_BELOW}
    final = read_jsonl(out / "final-results.jsonl")
    models: dict[str, list[dict]] = defaultdict(list)
    for r in final:
        models[r["model"]].append(r)
    summary = {m["model"]: m for m in json.loads((out / "summary.json").read_text())["models"]}
    order = list(summary)
    base, student = order[0], next((m for m in order if m.rstrip("/").endswith("distilled")), order[1])

    say(f"## Half B: every artefact (failing cells: {len(failing)} of {len(by_cell)} (family, level) cells "
        f"where the base gets < {FAILING_BELOW:.0%} of half A)\n")
    say("| artefact | accuracy % | failing cells % | other cells % | share of student | bits/byte | "
        "Δ bits/byte vs base | mean output tokens | size MB |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    acc = {m: accuracy(models[m]) for m in order}
    fail_acc = {m: accuracy([r for r in models[m] if cell(r) in failing]) for m in order}
    other_acc = {m: accuracy([r for r in models[m] if cell(r) not in failing]) for m in order}
    bpb = {m: (summary[m].get("ppl") or {}).get("bits_per_byte") for m in order}
    for m in order:
        share = acc[m] / acc[student] if acc[student] else None
        dbpb = (f"{100 * (bpb[m] / bpb[base] - 1):+.1f}%" if bpb[m] and bpb[base] else "–")
        tokens = [r.get("output_tokens") or 0 for r in models[m]]
        say(f"| {short(m, out)} | {pct(acc[m])} | {pct(fail_acc[m])} | {pct(other_acc[m])} | "
            f"{pct(share)} | {bpb[m]:.4f} | {dbpb} | {sum(tokens) / max(len(tokens), 1):.1f} | "
            f"{summary[m].get('size_mb', 0):,.1f} |" if bpb[m] else
            f"| {short(m, out)} | {pct(acc[m])} | {pct(fail_acc[m])} | {pct(other_acc[m])} | {pct(share)} | – | – | "
            f"{sum(tokens) / max(len(tokens), 1):.1f} | {summary[m].get('size_mb', 0):,.1f} |")
    say("")
    gain_all = (acc[student] - acc[base]) * 100 if acc[student] is not None else None
    gain_fail = ((fail_acc[student] - fail_acc[base]) * 100
                 if fail_acc[student] is not None and fail_acc[base] is not None else None)
    verdict = f"Student vs base on half B: {gain_all:+.1f} points overall, " + (
        f"{gain_fail:+.1f} points on the failing cells" if gain_fail is not None else "no failing cells")
    if bpb[student] and bpb[base]:
        change = 100 * (bpb[student] / bpb[base] - 1)
        verdict += f"; held-out bits/byte {bpb[base]:.4f} → {bpb[student]:.4f} ({change:+.2f}%)"
    say(verdict + ".\n")

    say("## Half B by family: base → student\n\n| family | level | failing on A | base % | student % | n |")
    say("|---|---:|:---:|---:|---:|---:|")
    b_cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for m in (base, student):
        for r in models[m]:
            b_cells[cell(r)][m].append(r)
    for c in sorted(b_cells, key=lambda c: (str(c[0]), c[1] or 0)):
        say(f"| {c[0]} | {c[1]} | {'yes' if c in failing else ''} | {pct(accuracy(b_cells[c][base]))} | "
            f"{pct(accuracy(b_cells[c][student]))} | {len(b_cells[c][base])} |")
    say("")

    if (out / "route-summary.json").is_file():
        route = json.loads((out / "route-summary.json").read_text())
        say("## Routing on half B\n")
        say(f"Routed accuracy {pct(route.get('accuracy'))}% with {pct(route.get('accurate_share'))}% of calls sent "
            f"to base + modifier (always-base {pct(route.get('always_fast_accuracy'))}%, "
            f"always-student {pct(acc[student])}% in the final bench).\n")

    rl = next((m for m in order if m.rstrip("/").endswith("/rl")), None)
    if rl:
        manifest = json.loads((Path(rl) / "orstack.json").read_text())
        metrics = manifest.get("metrics", {})
        tokens = {m: [r.get("output_tokens") or 0 for r in models[m]] for m in (student, rl)}
        say("## rl: effect on length and accuracy (half B)\n")
        say(f"student {pct(acc[student])}% at {sum(tokens[student]) / len(tokens[student]):.1f} output tokens → "
            f"rl {pct(acc[rl])}% at {sum(tokens[rl]) / len(tokens[rl]):.1f} output tokens.")
        keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if keep:
            say("rl's own metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(keep.items())) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
