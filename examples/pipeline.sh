#!/usr/bin/env bash
# The orstack pipeline as a plain script: each step is one command reading and writing files,
# and steps compose through pipes. (examples/Makefile is the same with real dependencies.)
#
#   bash examples/pipeline.sh [OUT_DIR]      # default: demo-out/script; ORSTACK=... to pick the binary
set -euo pipefail

OUT=${1:-demo-out/script}
ORSTACK=${ORSTACK:-orstack}
PYTHON=${PYTHON:-python3}
STEPS=${TINY_STEPS:-1000}
HERE=$(cd "$(dirname "$0")" && pwd)
orstack() { "$ORSTACK" --seed 0 "$@"; }
mkdir -p "$OUT"

# the embedded default model, its tasks and text
[ -f "$OUT/tiny/orstack.json" ] || orstack tiny -o "$OUT/tiny" --tasks-out "$OUT/tasks" --steps "$STEPS"
T="$OUT/tasks"

# baseline results go to stdout; jq keeps the failures; cluster-failures reads them from stdin
orstack bench "$OUT/tiny" --tasks "$T/heldout.jsonl" \
  | tee "$OUT/base.jsonl" \
  | jq -c 'select(.correct | not)' \
  | orstack cluster-failures - -k auto --embedder tfidf --annotate "$OUT/failures.jsonl" -o "$OUT/clusters.jsonl"

# failure-targeted distillation with an exact teacher program, then the compression chain
orstack distill generate --failures "$OUT/failures.jsonl" --teacher "cmd:$PYTHON $HERE/oracle.py" -o "$OUT/train.jsonl"
orstack distill train "$OUT/tiny" --data "$OUT/train.jsonl" --max-steps 150 --lr 1e-3 --merge -o "$OUT/distilled"
orstack vocab-trim "$OUT/distilled" --corpus "$T/corpus.txt" --validate "$T/heldout.txt" -o "$OUT/trimmed"
orstack prune "$OUT/trimmed" --calib "$T/corpus.txt" --method wanda --sparsity 0.5 --seqlen 64 -o "$OUT/pruned"
orstack awq "$OUT/pruned" --calib "$T/corpus.txt" --seqlen 64 -o "$OUT/awq"
orstack gguf "$OUT/awq" --type q4_1 -o "$OUT/awq-q4_1.gguf"
orstack zstd-pack "$OUT/trimmed" -o "$OUT/trimmed.orz"

# every artefact side by side; --fail-under makes this a CI gate
orstack bench "$OUT/tiny" "$OUT/distilled" "$OUT/trimmed" "$OUT/pruned" "$OUT/awq" "$OUT/awq-q4_1.gguf" \
  "$OUT/trimmed.orz" --tasks "$T/heldout.jsonl" --ppl "$T/heldout.txt" --summary "$OUT/summary.json" \
  -o "$OUT/final.jsonl"
jq '.[] | {model, accuracy, bits_per_byte: .ppl.bits_per_byte, size_mb}' "$OUT/summary.json" 2>/dev/null \
  || cat "$OUT/summary.json"
