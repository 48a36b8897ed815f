"""Linear probing of a frozen pretrained encoder (``linprobe`` console script)."""
