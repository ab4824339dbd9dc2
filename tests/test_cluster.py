"""cluster-failures: planted groups come back, order does not matter, bad input is one line."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from conftest import run_orstack, run_orstack_read_only, tree_hash

from orstack.cluster_failures import ClusterConfig, annotated_rows, cluster_failures
from orstack.cluster_failures.ctfidf import class_tfidf
from orstack.console import set_quiet
from orstack.errors import BadInput

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "violin", "mirror"]


def planted_rows(n_per_group: int = 20, seed: int = 0) -> list[dict]:
    """Three kinds of failure with random contents: sums, word reversals, comparisons."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_group):
        a, b = rng.randrange(100, 500), rng.randrange(100, 500)
        rows.append({"id": f"add-{i}", "prompt": f"{a}+{b}=", "output": str(a + b + 1), "correct": False,
                     "group": "add"})
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(5, 8)))
        rows.append({"id": f"rev-{i}", "prompt": f"rev {w}=", "output": w, "correct": False, "group": "rev"})
        rows.append({"id": f"cmp-{i}", "prompt": f"cmp {a} {b}=", "output": "=", "correct": False, "group": "cmp"})
    rng.shuffle(rows)
    return rows


def semantic_rows(n_per_group: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_group):
        rows.append({"id": f"math-{i}", "prompt": f"What is {rng.randrange(10, 99)} plus {rng.randrange(10, 99)}?",
                     "output": str(rng.randrange(100)), "group": "math"})
        rows.append({"id": f"fr-{i}", "prompt": f"Translate the word '{rng.choice(WORDS)}' into French.",
                     "output": "je ne sais pas", "group": "french"})
        rows.append({"id": f"code-{i}", "prompt": f"Write a Python function that sorts a list of {rng.choice(WORDS)}s.",
                     "output": "def f(x): return x", "group": "code"})
    rng.shuffle(rows)
    return rows


def ari(rows: list[dict], result) -> float:
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score([rows[i]["group"] for i in result.kept], result.assignments)


def by_id(rows: list[dict], result) -> dict[str, int]:
    return {rows[i]["id"]: c for i, c in zip(result.kept, result.assignments)}


def test_tfidf_recovers_planted_groups_with_k_auto():
    rows = planted_rows()
    result = cluster_failures(rows, ClusterConfig(embedder="tfidf", k=None, n_init=5))
    assert len(result.clusters) == 3
    assert ari(rows, result) == pytest.approx(1.0)
    assert sum(c["size"] for c in result.clusters) == len(rows)
    assert [c["cluster"] for c in result.clusters] == [0, 1, 2]
    labels = " ".join(c["label"] for c in result.clusters)
    assert "rev" in labels and "cmp" in labels and "+" in labels
    for c in result.clusters:
        assert len(c["representatives"]) == 20 and not c["flagged"] and c["silhouette"] > 0.3


def test_shuffled_input_gives_the_same_clusters():
    rows = planted_rows(15, seed=1) + semantic_rows(5, seed=1)
    config = ClusterConfig(embedder="tfidf", k=4, n_init=3)
    first = cluster_failures(rows, config)
    for seed in (1, 2):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        again = cluster_failures(shuffled, config)
        assert again.clusters == first.clusters
        assert by_id(shuffled, again) == by_id(rows, first)


def test_minilm_clusters_by_meaning_and_ignores_order():
    pytest.importorskip("sentence_transformers")
    from orstack.cluster_failures.embed import find_minilm

    try:
        find_minilm()
    except BadInput:
        pytest.skip("all-MiniLM-L6-v2 not available offline")
    rows = semantic_rows()
    config = ClusterConfig(embedder="minilm", k=3, n_init=5)
    result = cluster_failures(rows, config)
    assert ari(rows, result) > 0.9
    shuffled = rows[::-1]
    again = cluster_failures(shuffled, config)
    assert again.clusters == result.clusters and by_id(shuffled, again) == by_id(rows, result)


def test_class_tfidf_matches_the_formula():
    import numpy as np

    counts = np.array([[3, 0, 1], [1, 2, 0]])
    # A = 7 terms / 2 classes; f = [4, 2, 1]
    expected = np.array([[3 / 4 * np.log(1 + 3.5 / 4), 0, 1 / 4 * np.log(1 + 3.5 / 1)],
                         [1 / 3 * np.log(1 + 3.5 / 4), 2 / 3 * np.log(1 + 3.5 / 2), 0]])
    assert np.allclose(class_tfidf(counts), expected)


def test_only_failures_by_default_and_all_on_request():
    rows = planted_rows(10)
    rows += [{"id": f"ok-{i}", "prompt": f"{i}+{i}=", "output": str(2 * i), "correct": True} for i in range(5)]
    assert len(cluster_failures(rows, ClusterConfig(embedder="tfidf", k=3)).kept) == 30
    assert len(cluster_failures(rows, ClusterConfig(embedder="tfidf", k=3, only_failures=False)).kept) == 35


def test_single_row_and_k_larger_than_rows():
    one = cluster_failures([{"id": "x", "prompt": "1+1=", "output": "3"}], ClusterConfig(embedder="tfidf"))
    assert one.assignments == [0] and one.clusters[0]["size"] == 1 and one.clusters[0]["silhouette"] is None
    rows = planted_rows(2)
    many = cluster_failures(rows, ClusterConfig(embedder="tfidf", k=50))
    assert 1 <= len(many.clusters) <= len(rows)
    assert sorted(set(many.assignments)) == list(range(len(many.clusters)))


def test_annotated_rows_keep_fields_and_input_order():
    rows = planted_rows(5)
    result = cluster_failures(rows, ClusterConfig(embedder="tfidf", k=3))
    out = annotated_rows(rows, result)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    labels = {c["cluster"]: c["label"] for c in result.clusters}
    assert all(r["group"] and r["cluster_label"] == labels[r["cluster"]] for r in out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    """`orstack --quiet ARGS` in this process (subprocesses spend 10-20 s importing on a loaded machine)."""
    result = run_orstack("--quiet", *args)
    set_quiet(False)
    return result.returncode, result.stdout, result.stderr


def test_cli_writes_clusters_annotations_and_plot(tmp_path, capsys):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(10))
    out, ann, png = tmp_path / "clusters.jsonl", tmp_path / "ann.jsonl", tmp_path / "p.png"
    code, stdout, err = run_cli(["cluster-failures", str(src), "-o", str(out), "--annotate", str(ann),
                                 "--embedder", "tfidf", "-k", "3", "--plot", str(png)], capsys)
    assert code == 0, err
    assert stdout == ""
    clusters = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(clusters) == 3
    assert set(clusters[0]) >= {"cluster", "label", "keywords", "size", "silhouette", "representatives", "flagged"}
    annotated = [json.loads(line) for line in ann.read_text().splitlines()]
    assert len(annotated) == 30 and all("cluster" in r and "cluster_label" in r for r in annotated)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_clusters_to_stdout(tmp_path, capsys):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(4))
    code, stdout, _ = run_cli(["cluster-failures", str(src), "--embedder", "tfidf", "-k", "2"], capsys)
    assert code == 0
    assert len(stdout.splitlines()) == 2


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("", [], "no rows"),
        ('{"id": 1, "prompt": "1+1=", "correct": true}\n', [], "no failures"),
        ('{"id": 1, "prompt": "1+1="}\n{"id": 2, "answer": "3"}\n', [], "results.jsonl:2: missing field 'prompt'"),
        ('{"id": 1, "prompt": "1+1="}\nnot json\n', [], "results.jsonl:2: not valid JSON"),
        ('{"id": 1, "prompt": "1+1="}\n', ["-k", "zero"], "-k"),
        ('{"id": 1, "prompt": "1+1="}\n', ["--embedder", "/no/such/model"], "--embedder"),
        ('{"id": 1, "prompt": "1+1="}\n', ["--labeler", "localhost:8080"], "--labeler"),
        ('{"id": 1, "prompt": "1+1="}\n', ["--fields", ","], "--fields"),
        ('{"id": 1, "prompt": "1+1=", "correct": false}\n{"id": 2, "prompt": "2+2=", "correct": "no"}\n', [],
         "results.jsonl:2: field 'correct' must be true or false, got \"no\""),
        ('{"id": 1, "prompt": "1+1=", "correct": 0}\n', [], "results.jsonl:1: field 'correct'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, content, extra, message):
    src = tmp_path / "results.jsonl"
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "clusters.jsonl"
    code, stdout, err = run_cli(["cluster-failures", str(src), "-o", str(out), "--embedder", "tfidf", *extra], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_missing_input_file(tmp_path, capsys):
    code, stdout, err = run_cli(["cluster-failures", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{tmp_path / 'nope.jsonl'}: no such file" in err and stdout == ""
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_directory_as_input_says_so(tmp_path):
    code, _, err = run_cli(["cluster-failures", str(tmp_path), "-o", str(tmp_path / "o")])
    assert code == 2 and f"{tmp_path}: is a directory" in err and list(tmp_path.iterdir()) == []


def test_with_all_a_non_boolean_correct_is_not_read(tmp_path):
    rows = planted_rows(4)
    rows[0]["correct"] = "no"
    src = write_jsonl(tmp_path / "results.jsonl", rows)
    code, stdout, err = run_cli(["cluster-failures", str(src), "--all", "--embedder", "tfidf", "-k", "3"])
    assert code == 0, err
    assert sum(json.loads(line)["size"] for line in stdout.splitlines()) == len(rows)


@pytest.mark.parametrize("option", ["-o", "--annotate", "--plot"])
def test_an_existing_directory_as_an_output_is_refused_and_kept(tmp_path, option):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(2))
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "notes.txt").write_text("the user's notes")
    before = tree_hash(tmp_path)
    others = [] if option == "-o" else ["-o", str(tmp_path / "clusters.jsonl")]
    code, stdout, err = run_cli(["cluster-failures", str(src), option, str(mydir), *others, "--embedder", "tfidf"])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert f"{option} {mydir}: is a directory" in err and tree_hash(tmp_path) == before


def test_clusters_and_annotations_on_one_path_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(2))
    same = tmp_path / "out.jsonl"
    same.write_text('{"earlier": "output"}\n')
    before = tree_hash(tmp_path)
    code, stdout, err = run_cli(["cluster-failures", str(src), "-o", str(same), "--annotate", str(same),
                                 "--embedder", "tfidf"])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert f"--annotate {same}: the same path as -o" in err and tree_hash(tmp_path) == before


def test_the_input_as_an_output_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(2))
    before = tree_hash(tmp_path)
    code, _, err = run_cli(["cluster-failures", str(src), "--annotate", str(src), "-o", str(tmp_path / "c.jsonl"),
                            "--embedder", "tfidf"])
    assert code == 2 and f"--annotate {src}: would overwrite the input" in err and tree_hash(tmp_path) == before


def test_a_read_only_output_location_is_refused_before_any_work(tmp_path):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(2))
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "clusters.jsonl").write_text('{"earlier": "clusters"}\n')
    before = tree_hash(ro)
    result = run_orstack_read_only(ro, "--quiet", "cluster-failures", src, "-o", ro / "clusters.jsonl",
                                   "--embedder", "tfidf")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and f"-o {ro / 'clusters.jsonl'}" in result.stderr
    assert "cannot write" in result.stderr and tree_hash(ro) == before


def test_a_model_directory_that_is_not_a_sentence_embedder_is_refused(random_llama, tmp_path):
    src = write_jsonl(tmp_path / "results.jsonl", planted_rows(2))
    code, stdout, err = run_cli(["cluster-failures", str(src), "--embedder", str(random_llama)])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert f"--embedder {random_llama}: not a sentence-transformers model directory" in err


def test_cli_defaults_are_the_config_defaults():
    import dataclasses

    from typer.main import get_command

    from orstack.cli import app
    from orstack.commands.cluster_failures import parse_fields, parse_k

    params = {p.name: p.default for p in get_command(app).commands["cluster-failures"].params}
    cli = {"fields": parse_fields(params["fields"]), "k": parse_k(params["k"]), "k_max": params["k_max"],
           "n_init": params["n_init"], "embedder": params["embedder"], "labeler": params["labeler"],
           "only_failures": params["only_failures"]}
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ClusterConfig)}
    # n_representatives and n_keywords have no option; the seed is the global --seed (default 0).
    assert set(defaults) - set(cli) == {"n_representatives", "n_keywords", "seed"}
    assert cli == {name: defaults[name] for name in cli} and defaults["seed"] == 0


class _FakeChat(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions that records what it was asked."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Multi-digit addition\n"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args) -> None:
        pass


def test_labeler_endpoint_labels_clusters_and_falls_back_when_down():
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1#tiny"
        rows = planted_rows(4)
        result = cluster_failures(rows, ClusterConfig(embedder="tfidf", k=3, labeler=url))
    finally:
        server.shutdown()
        server.server_close()
    assert [c["label"] for c in result.clusters] == ["Multi-digit addition"] * 3
    asked = _FakeChat.requests[-1]
    assert asked["path"] == "/v1/chat/completions" and asked["model"] == "tiny"
    down = cluster_failures(rows, ClusterConfig(embedder="tfidf", k=3, labeler=url))  # server is gone now
    assert all(c["label"] != "Multi-digit addition" for c in down.clusters)
