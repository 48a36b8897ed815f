"""Curation of heterogeneous medical images into WebDataset shards (the ``curate`` CLI)."""
