"""File I/O shared by every stage: JSONL, atomic outputs, checkpoints and manifests."""
