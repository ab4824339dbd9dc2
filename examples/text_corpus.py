#!/usr/bin/env python3
"""General English text for vocab-trim's corpus, from what this machine has: every Debian
package's copyright file and compressed documentation under /usr/share/doc.

vocab-trim keeps only the tokens its corpus uses, and its gate measures perplexity on held-out
text. A corpus of the task suite and a few licences keeps ~4,500 of SmolLM2's 49,152 tokens and
the held-out half of the GPL then loses 41% perplexity; with this text ~31,700 are kept (see
docs/real-model.md). Lines that also occur in an --exclude file (the held-out text: many
copyright files quote the GPL) are dropped, so the held-out text stays unseen; bytes that are
not UTF-8 are dropped. The installed packages decide the text, so the kept vocabulary differs
from machine to machine; the file's size and line count are printed.

    python examples/text_corpus.py --exclude /usr/share/common-licenses/GPL-3 --max-mb 80 -o docs.txt
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

MIN_EXCLUDED_LINE = 20  # shorter lines ("", "  b)", "END OF TERMS") are common to every text


def documents(root: Path):
    """The text files of `root`, in a fixed (sorted) order: copyright files, then *.gz files."""
    yield from sorted(root.glob("*/copyright"))
    yield from sorted(root.rglob("*.gz"))


def read_text(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    return data.decode("utf-8", errors="ignore")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/usr/share/doc"))
    ap.add_argument("--exclude", type=Path, action="append", default=[], help="Drop lines found in this file.")
    ap.add_argument("--max-mb", type=float, default=80.0, help="Stop after this many megabytes.")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()

    excluded = {line.strip() for path in args.exclude for line in path.read_text(encoding="utf-8").splitlines()
                if len(line.strip()) > MIN_EXCLUDED_LINE}
    limit = int(args.max_mb * 1e6)
    size = lines = 0
    tmp = args.output.with_name(args.output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for path in documents(args.root):
            kept = [line for line in read_text(path).splitlines() if line.strip() not in excluded]
            text = "\n".join(kept) + "\n"
            out.write(text)
            size += len(text.encode("utf-8"))
            lines += len(kept)
            if size >= limit:
                break
    tmp.replace(args.output)
    print(f"{args.output}: {size / 1e6:.1f} MB, {lines:,} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
