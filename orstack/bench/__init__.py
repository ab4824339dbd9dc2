"""`orstack bench`: task accuracy, perplexity, speed, memory and size of models, side by side.

runner.py asks each model (through orstack.backends) for the tasks, perplexity and speed;
report.py prints the side-by-side table and lineage; speed.py times prefill and decode.
The task contract and verifiers live in orstack/tasks/, the model runtimes in orstack/backends/.
"""
