"""`orstack bench`: task accuracy, perplexity, speed, memory and size of models, side by side.

    from orstack.bench import BenchConfig, run
    result = run(["tiny", "tiny.gguf"], BenchConfig(tasks="heldout.jsonl", speed=True), runtime)

runner.py is the stage (`run`, and `score` for outputs made elsewhere): it checks every input
and output, then asks each model (through orstack.backends) for the tasks, perplexity and
speed; report.py builds the side-by-side table, lineage and plot; speed.py times prefill and
decode. The task contract and verifiers live in orstack/tasks/, the model runtimes in
orstack/backends/.
"""

from orstack.bench.runner import BenchConfig, BenchOutputs, BenchResult, run, score

__all__ = ["BenchConfig", "BenchOutputs", "BenchResult", "run", "score"]
