"""`--shard I/N` on bench and distill generate: the N shards' outputs, concatenated in shard
order, are the unsharded run's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_orstack

from orstack.errors import BadInput
from orstack.tasks.shard import parse_shard, shard_bounds, take_shard


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shards_are_contiguous_near_equal_blocks_that_cover_everything():
    for n_items in (0, 1, 5, 17):
        for count in (1, 2, 3, 7):
            blocks = [take_shard(list(range(n_items)), f"{i}/{count}") for i in range(count)]
            assert sum(blocks, []) == list(range(n_items))
            sizes = [len(b) for b in blocks]
            assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(10, 2, 3) == (6, 10)
    assert parse_shard(None) is None and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1", "-1/4", "a/b", "0/0"):
        with pytest.raises(BadInput, match="--shard"):
            parse_shard(bad)


FLOATS = ("mean_logprob", "min_logprob", "mean_entropy", "choice_loglikelihoods")


def _without_timing(text: str) -> list[dict]:
    rows = [json.loads(line) for line in text.splitlines()]
    for r in rows:
        r.pop("latency_ms")
    return rows


@pytest.mark.slow  # three bench runs (~20 s)
def test_bench_shards_concatenate_to_the_whole_run(random_llama, tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", [
        {"id": f"t{i}", "prompt": f"{i}+{i * 3}=", "kind": "numeric", "answer": str(4 * i)} for i in range(7)
    ] + [{"id": "c", "prompt": "pick", "kind": "choice", "choices": ["a", "b"], "answer": 0},
         {"id": "e", "prompt": "rev ab=", "kind": "exact", "answer": "ba"}])
    common = ("--tasks", str(tasks), "--max-new-tokens", "4", "--batch-size", "3")
    whole = run_orstack("bench", str(random_llama), *common, "-o", str(tmp_path / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr
    parts = []
    for i in range(2):
        out = tmp_path / f"part{i}.jsonl"
        done = run_orstack("bench", str(random_llama), *common, "--shard", f"{i}/2", "-o", str(out))
        assert done.returncode == 0, done.stderr
        parts.append(out.read_text())
    assert [len(p.splitlines()) for p in parts] == [4, 5]  # batches of 3 fall differently than in the whole run
    sharded, unsharded = _without_timing("".join(parts)), _without_timing((tmp_path / "whole.jsonl").read_text())
    assert [{k: v for k, v in r.items() if k not in FLOATS} for r in sharded] == \
        [{k: v for k, v in r.items() if k not in FLOATS} for r in unsharded]
    # other batch neighbours pad the prompts differently: the same tokens, float noise in their logprobs
    for a, b in zip(sharded, unsharded):
        for k in FLOATS:
            assert a.get(k) == pytest.approx(b.get(k), abs=1e-5), k


def test_bench_shard_usage_errors(random_llama, tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": 1, "prompt": "1+1=", "kind": "numeric", "answer": "2"}])
    for extra, message in (((("--shard", "0/2")), "no tasks in this shard (1 tasks in all)"),
                           ((("--shard", "1of2")), "expected I/N"),
                           ((("--shard", "0/2", "--speed")), "measure --ppl and --speed unsharded")):
        done = run_orstack("bench", str(random_llama), "--tasks", str(tasks), *extra, "-o", str(tmp_path / "o"))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "o").exists()


ORACLE = """\
import json, random, re, sys
for line in sys.stdin:
    t = json.loads(line)
    if t.get("request") == "variant":
        rng = random.Random(t["id"])
        a, b = rng.randrange(50), rng.randrange(50)
        reply = f"Problem: {a}+{b}=\\nAnswer: {a + b}"
    else:
        m = re.fullmatch(r"(\\d+)\\+(\\d+)=", t["prompt"])
        reply = str(int(m[1]) + int(m[2])) if m and int(m[1]) % 3 else "?"
    print(json.dumps({"id": t["id"], "response": reply}))
"""


def test_distill_generate_shards_concatenate_to_the_whole_run(tmp_path):
    (tmp_path / "oracle.py").write_text(ORACLE, encoding="utf-8")
    teacher = f"cmd:{sys.executable} {tmp_path / 'oracle.py'}"
    rows = [{"id": f"f{i}", "prompt": f"{i}+{2 * i}=", "answer": str(3 * i), "kind": "numeric", "correct": False,
             "cluster": i % 4, "cluster_label": f"c{i % 4}"} for i in range(16)]
    rows.append(dict(rows[5], id="dup", cluster=0))  # a duplicate of another cluster's failure
    failures = write_jsonl(tmp_path / "f.jsonl", rows)
    common = ("distill", "generate", "--failures", str(failures), "--teacher", teacher, "--per-cluster", "3")
    whole = run_orstack(*common, "-o", str(tmp_path / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr
    text = (tmp_path / "whole.jsonl").read_text()
    examples = [json.loads(line) for line in text.splitlines()]
    assert {e["source"] for e in examples} and any(e.get("origin") == "variant" for e in examples)
    assert len({e["cluster"] for e in examples}) == 4
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}.jsonl"
        done = run_orstack(*common, "--shard", f"{i}/3", "-o", str(out))
        assert done.returncode == 0, done.stderr
        parts.append(out.read_text())
    assert all(parts) and "".join(parts) == text
    done = run_orstack(*common, "--shard", "0/5", "-o", str(tmp_path / "none.jsonl"))
    assert done.returncode == 2 and "no clusters in this shard (4 clusters in all)" in done.stderr
    assert not (tmp_path / "none.jsonl").exists()
