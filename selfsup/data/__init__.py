"""Data: built-in real datasets, WebDataset shard writing and streaming, per-method views."""
