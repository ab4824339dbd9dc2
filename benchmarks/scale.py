"""Models larger than memory (issue 14): peak resident memory and wall time of prune (wanda),
awq and gguf on random-init Llama-shaped checkpoints saved in bfloat16, streamed (the default:
orstack.layerwise.StreamedModel reads one layer at a time) beside the whole-model load
(`Runtime(stream=False)`), and the fit of the streamed peak against the largest unit one
stage holds at a time -- a decoder layer or an embedding matrix in float32 -- projected to an
8B-class model (Llama-3-8B's shapes).

Each run is its own process (`scale.py --child ...`), so its peak RSS (getrusage ru_maxrss:
anonymous memory plus mapped file pages) is its own. Checkpoints are built here tensor by
tensor (normal(0, 0.02) weights, unit norms) straight into safetensors shards, never as a
model in memory. Settings are small on purpose (4 calibration windows of 64 tokens by default,
the same 600-character text held out, gguf q8_0 without llama.cpp validation; `--awq-steps`
cuts awq's alpha and clip grids): memory is the measure, and the per-layer working set does
not depend on them beyond the calibration activations.

    python benchmarks/scale.py            # ~0.1B, ~0.5B, ~1.5B (awq to 0.5B); in-memory baseline to 0.5B
    python benchmarks/scale.py --baseline-max 0.1B --awq-max 0.1B   # what fits a loaded machine's hour
    python benchmarks/scale.py --quick    # skips ~1.5B
    python benchmarks/scale.py --sizes 8B --stages gguf --baseline-max 0.1B   # Llama-3-8B's shapes, 16 GB
    python benchmarks/scale.py --json out.json
    python benchmarks/scale.py --report a.json b.json   # the tables of earlier runs, merged
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 32_000
# name -> (hidden, intermediate, layers, heads, kv heads)
SIZES = {
    "0.1B": (768, 2048, 12, 12, 4),
    "0.5B": (1536, 4096, 16, 12, 4),
    "1.5B": (2048, 5632, 30, 16, 4),
}
LLAMA3_8B = (4096, 14336, 32, 32, 8, 128_256)  # hidden, intermediate, layers, heads, kv, vocab
STAGES = ("prune", "awq", "gguf")
OLD_CALIB = {"prune": "4x64", "awq": "4x64, 20 steps", "gguf": "-"}  # rows of --json files written before --nsamples
# The issue's figures for today's path before this work (284M-parameter Llama, bf16 file 567 MB).
ISSUE_BASELINE = {"file_mb": 567, "prune": 2697, "awq": 2930}
TEXT = ("The river carries sand and silt towards the sea, building deltas and plains over many centuries. "
        "Printing spread quickly across Europe, and the price of a book fell so far that a student could own "
        "several. 12+345=357. rev stone=enots. sort dcba=abcd. ") * 40


ORDER = [*SIZES, "8B"]  # "8B" only when asked for (--sizes 8B): 16 GB to build


def dims(size: str) -> tuple[int, int, int, int, int, int]:
    return LLAMA3_8B if size == "8B" else (*SIZES[size], VOCAB)


def shapes(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = VOCAB) -> dict[str, tuple]:
    head_dim = hidden // heads
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                    p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                    p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
                    p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter)})
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def count(shape_map: dict[str, tuple]) -> int:
    total = 0
    for shape in shape_map.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def largest_unit_fp32(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = VOCAB) -> int:
    """Bytes of the largest thing a streamed stage holds in float32 at once: a decoder layer or
    an embedding/output matrix."""
    one_layer = count({k: v for k, v in shapes(hidden, inter, 1, heads, kv, vocab).items() if ".layers.0." in k})
    return 4 * max(one_layer, vocab * hidden)


def build(out: Path, size: str) -> Path:
    """A random-init Llama in bfloat16, written tensor by tensor (orstack's ShardedWriter).

    "8B" is Llama-3-8B's shapes (vocab 128,256, 16 GB): drawing 8 billion normals would cost
    more CPU than the runs it feeds on a shared machine, so its matrices are cut from one pool
    of 2^26 normal(0, 0.02) values (each tensor from its own offset): the same shapes, dtype
    and value distribution, which is all the memory measure depends on."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from orstack.io.safetensors_file import ShardedWriter

    if (out / "config.json").is_file():
        return out
    hidden, inter, layers, heads, kv, vocab = dims(size)
    tmp = out.with_name(out.name + ".building")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT.split(". "), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(tmp)
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(2**26, generator=generator) * 0.02).to(torch.bfloat16) if size == "8B" else None
    writer = ShardedWriter(tmp, metadata={"format": "pt"})
    for index, (name, shape) in enumerate(shapes(hidden, inter, layers, heads, kv, vocab).items()):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif pool is None:
            t = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        else:
            n = shape[0] * shape[1]
            start = (index * 7_919_173) % pool.numel()
            t = pool.roll(-start).repeat(-(-n // pool.numel()))[:n].reshape(shape)
        writer.add(name, t)
        del t
    writer.close()
    tmp.replace(out)
    return out


def child(stage: str, source: str, output: str, stream: bool, text: str, nsamples: int, seqlen: int,
          awq_steps: int) -> None:
    """One run in this process; prints its figures as one JSON line."""
    from orstack.runtime import Runtime

    runtime = Runtime(device="cpu", stream=stream, seed=0)
    start = time.perf_counter()
    if stage == "prune":
        from orstack.prune import PruneConfig, run

        run(source, output, PruneConfig(method="wanda", calib=[text], heldout=[text], nsamples=nsamples, seqlen=seqlen,
                                        eval_length=64, force=True), runtime)
    elif stage == "awq":
        from orstack.awq import AWQConfig, run

        run(source, output, AWQConfig(calib=[text], nsamples=nsamples, seqlen=seqlen, alpha_steps=awq_steps,
                                 clip_steps=awq_steps, force=True), runtime)
    else:
        from orstack.gguf import GgufConfig, run

        run(source, output, GgufConfig(type="q8_0", validate=False), runtime)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def run_child(stage: str, source: Path, work: Path, stream: bool, text: Path, calib: tuple[int, int, int]) -> dict:
    output = work / f"{source.name}-{stage}-{'stream' if stream else 'memory'}"
    if stage == "gguf":
        output = output.with_suffix(".gguf")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", stage, str(source), str(output), str(int(stream)), str(text),
           *map(str, calib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(output)], check=False)
    return figures


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the ~1.5B checkpoint")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "orstack-scale")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--sizes", help=f"comma-separated, of {', '.join(ORDER)} (default: all but 8B)")
    parser.add_argument("--report", type=Path, nargs="+", help="print the tables of --json files (merged) and exit")
    parser.add_argument("--no-stream", action="store_true", help="only the whole-model (in-memory) runs")
    parser.add_argument("--baseline-max", default="0.5B", help="largest size also run whole-model (in memory)")
    parser.add_argument("--awq-max", default="0.5B", help="largest size awq runs on (its search is the slow part)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nsamples", type=int, default=4, help="calibration windows (prune, awq)")
    parser.add_argument("--seqlen", type=int, default=64, help="tokens per calibration window")
    parser.add_argument("--awq-steps", type=int, default=20,
                        help="awq alpha and clip grid steps (default 20, its own; fewer: same working set, less time)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS,
                        metavar=("STAGE", "SOURCE", "OUTPUT", "STREAM", "TEXT", "N", "SEQLEN", "STEPS"))
    args = parser.parse_args()
    if args.child:
        stage, source, output, stream, text, nsamples, seqlen, steps = args.child
        child(stage, source, output, stream == "1", text, int(nsamples), int(seqlen), int(steps))
        return
    stages = [s for s in args.stages.split(",") if s]
    if args.report:
        merged: dict[tuple, dict] = {}
        for path in args.report:
            for row in json.loads(path.read_text(encoding="utf-8")):
                merged.setdefault((row["size"], row["stage"]), {}).update(row)
        report(sorted(merged.values(), key=lambda r: (ORDER.index(r["size"]), stages.index(r["stage"]))),
               stages)
        return
    sizes = [s for s in (args.sizes.split(",") if args.sizes else SIZES) if not (args.quick and s == "1.5B")]
    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "text.txt"
    text.write_text(TEXT[:600], encoding="utf-8")
    rows = []
    calib = (args.nsamples, args.seqlen, args.awq_steps)
    baseline_sizes = ORDER[: ORDER.index(args.baseline_max) + 1]
    by_key = {}
    # every streamed run first (the fit needs them; the cheap stages before awq), then the baselines
    awq_sizes = ORDER[: ORDER.index(args.awq_max) + 1]
    order = [(stage, size) for size in sizes for stage in stages if stage != "awq" or size in awq_sizes]
    for stage, size in order:
        source = build(args.work / f"llama-{size}", size)
        file_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        row = {"size": size, "params": count(shapes(*dims(size))), "file_bytes": file_bytes,
               "unit_bytes": largest_unit_fp32(*dims(size)), "stage": stage,
               "calib": {"prune": f"{args.nsamples}x{args.seqlen}", "gguf": "-",
                         "awq": f"{args.nsamples}x{args.seqlen}, {args.awq_steps} steps"}[stage]}
        if not args.no_stream:
            row["stream"] = run_child(stage, source, args.work, True, text, calib)
            print(f"{size} {stage} streamed: {row['stream']['peak_bytes'] / 2**20:,.0f} MB, "
                  f"{row['stream']['seconds']:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
        by_key[size, stage] = row
        _save(args.json, rows)
    for stage, size in order:
        if size in baseline_sizes:
            row = by_key[size, stage]
            row["memory"] = run_child(stage, args.work / f"llama-{size}", args.work, False, text, calib)
            print(f"{size} {stage} in memory: {row['memory']['peak_bytes'] / 2**20:,.0f} MB, "
                  f"{row['memory']['seconds']:.0f} s", file=sys.stderr, flush=True)
            _save(args.json, rows)
    report(rows, stages)


def _save(path: Path | None, rows: list[dict]) -> None:
    """Row by row: a long run interrupted keeps what it measured."""
    if path is not None:
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def report(rows: list[dict], stages: list[str]) -> None:
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print("| model | params | bf16 file MB | stage | calibration | streamed peak MB | x file | s "
          "| in-memory peak MB | x file | s |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    def cells(run: dict | None, file_bytes: int) -> str:
        if not run:
            return "- | - | -"
        return f"{mb(run['peak_bytes'])} | {run['peak_bytes'] / file_bytes:.2f} | {run['seconds']:.0f}"

    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {mb(r['file_bytes'])} | {r['stage']} | "
              f"{r.get('calib', OLD_CALIB[r['stage']])} | "
              f"{cells(r.get('stream'), r['file_bytes'])} | {cells(r.get('memory'), r['file_bytes'])} |")
    b = ISSUE_BASELINE
    print(f"\nBefore this work (issue 14, 284M Llama, bf16 file {b['file_mb']} MB): prune wanda {b['prune']:,} MB "
          f"({b['prune'] / b['file_mb']:.1f}x the file), awq {b['awq']:,} MB ({b['awq'] / b['file_mb']:.1f}x).")
    hidden, inter, layers, heads, kv, vocab = LLAMA3_8B
    unit_8b = largest_unit_fp32(hidden, inter, layers, heads, kv, vocab)
    file_8b = 2 * count(shapes(hidden, inter, layers, heads, kv, vocab))
    print(f"\nFit of the streamed peak: peak = a + b x (largest float32 unit held: a layer or an embedding "
          f"matrix); Llama-3-8B's is {mb(unit_8b)} MB (bf16 file {file_8b / 1e9:.1f} GB):")
    print("| stage | sizes fitted | a MB | b | projected 8B peak GB | measured 8B peak GB "
          "| file fit: peak = c + d x file, d |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for stage in stages:
        got = [r for r in rows if r["stage"] == stage and r.get("stream") and r["size"] != "8B"]
        if len(got) < 2:
            continue
        a, slope = fit([r["unit_bytes"] for r in got], [r["stream"]["peak_bytes"] for r in got])
        _, d = fit([r["file_bytes"] for r in got], [r["stream"]["peak_bytes"] for r in got])
        measured = [r["stream"]["peak_bytes"] for r in rows if r["stage"] == stage and r["size"] == "8B"
                    and r.get("stream")]
        print(f"| {stage} | {', '.join(r['size'] for r in got)} | {mb(a)} | {slope:.2f} | "
              f"{(a + slope * unit_8b) / 2**30:.1f} | {f'{measured[0] / 2**30:.1f}' if measured else '-'} | {d:.3f} |")


if __name__ == "__main__":
    main()
