"""Tasks: the Task and Result contracts, stop sequences, verifiers, the code sandbox, pass@k.

contract.py defines what a Task and a Result row are (one field list each) and checks
them; stops.py is the one home of stop sequences; verify.py decides whether an output
answers a task (bench, rl rewards and distill's verification all use it); sandbox.py runs
model-written code; passk.py estimates pass@k from samples; results.py turns tasks into Result
rows through any backend.
"""
