"""`orstack vocab-trim`: shrink a model's vocabulary to the tokens a corpus uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import DryRun, Force, MaxPplRise, RequiredOutput, current_runtime
from orstack.errors import BadInput
from orstack.vocab_trim.trim import VocabTrimConfig

HELP = """Shrink a model's vocabulary to the tokens a corpus uses, without changing tokenization.

Counts token frequencies over --corpus (text or JSONL, streamed), keeps the fewest tokens
covering --coverage of the occurrences (or the --max-vocab most frequent), plus special
tokens, the 256 byte tokens (any input still encodes), --keep tokens, the tokens of the
tokenizer's first --keep-merges merges (its own most frequent; a floor for text the corpus
lacks) and every token a kept token's BPE merges need. Rebuilds tokenizer.json (vocabulary, merges, special ids),
slices the embedding and output rows (tied or not) and stores the old->new id map in
orstack.json. With --validate HELDOUT it checks that every line still decodes to itself,
tokens per word rise at most 5% and perplexity (per parent token, so that a changed
tokenization cannot hide a loss) at most --max-ppl-rise (3%), bits per byte reported;
otherwise it exits 3 and writes nothing, unless --force. --dry-run prints the kept
vocabulary and the sliced tensors from the tokenizer, corpus and weight headers alone.
Byte-level BPE tokenizers only (GPT-2, Llama-3, SmolLM, Qwen).

Example:

\b
    orstack vocab-trim tiny/model --corpus tasks/corpus.txt \\
        --validate tasks/heldout.txt -o trimmed
"""


def vocab_trim(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Checkpoint directory (or hub id) with a byte-level BPE tokenizer.")],
    corpus: Annotated[list[Path], typer.Option("--corpus", help="Corpus: .txt or .jsonl. Repeatable.")],
    output: RequiredOutput,
    coverage: Annotated[
        float, typer.Option("--coverage", help="Share of corpus token occurrences to keep.")
    ] = VocabTrimConfig.coverage,
    max_vocab: Annotated[
        int | None, typer.Option("--max-vocab", min=1, help="Keep at most N tokens instead of --coverage.")
    ] = None,
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Tokens or words to keep, one per line (e.g. code keywords).")
    ] = None,
    keep_merges: Annotated[
        int, typer.Option("--keep-merges", min=0, help="Also keep the tokens of the tokenizer's first N merges "
                          "(its most frequent).")
    ] = VocabTrimConfig.keep_merges,
    validate: Annotated[
        Path | None, typer.Option("--validate", help="Held-out text (.txt/.jsonl) for the quality gate.")
    ] = None,
    force: Force = False,
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="Perplexity window in tokens.")] = 512,
    max_ppl_rise: MaxPplRise = 0.03,
    dry_run: DryRun = False,
) -> None:
    coverage_given = ctx.get_parameter_source("coverage").name != "DEFAULT"
    if coverage_given and max_vocab is not None:
        raise BadInput("--coverage and --max-vocab are exclusive: give one")
    config = VocabTrimConfig(corpus=[str(p) for p in corpus], coverage=None if max_vocab else coverage,
                             max_vocab=max_vocab, keep=str(keep) if keep else None, keep_merges=keep_merges,
                             validate=str(validate) if validate else None, force=force, max_length=max_length,
                             max_ppl_rise=max_ppl_rise)
    if dry_run:
        from orstack.vocab_trim.plan import plan

        plan(model, config).emit()
        return
    from orstack.vocab_trim import run

    result = run(model, output, config, current_runtime(), report=_report)
    if result.weights_before and result.weights_after:
        before, after = result.weights_before, result.weights_after
        console.info(f"weights on disk: {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB "
                     f"({1 - after / before:.1%} smaller); wrote {output}")


def _report(m: dict) -> None:
    tbl = console.new_table("measure", "before", "after", title="vocab-trim")
    tbl.add_row("vocabulary", f"{m['vocab_before']:,}", f"{m['vocab_after']:,}")
    tbl.add_row("merges", f"{m['merges_before']:,}", f"{m['merges_after']:,}")
    tbl.add_row("parameters", f"{m['params_before']:,}",
                f"{m['params_after']:,} (-{1 - m['params_after'] / m['params_before']:.1%})")
    tbl.add_row("corpus coverage", "", f"{m['coverage']:.4f}")
    tbl.add_row("same tokens on corpus lines", "", f"{m['corpus_agreement']:.2%}")
    tbl.add_row("  ... lines with all tokens kept", "", f"{m['corpus_agreement_kept']:.2%}")
    if "round_trip" in m:
        tbl.add_row("held-out round trip", "", f"{m['round_trip']:.2%}")
        tbl.add_row("same tokens on held-out", "", f"{m['heldout_agreement']:.2%}")
        tbl.add_row("tokens per word", f"{m['tokens_per_word_before']:.3f}", f"{m['tokens_per_word_after']:.3f}")
        tbl.add_row("bits per byte", f"{m['bits_per_byte_before']:.4f}", f"{m['bits_per_byte_after']:.4f}")
        tbl.add_row("perplexity (per parent token)", f"{m['ppl_before']:.4f}", f"{m['ppl_after']:.4f}")
    console.table(tbl)


def register(app: typer.Typer) -> None:
    app.command("vocab-trim", help=HELP)(vocab_trim)
