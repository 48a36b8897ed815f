"""End-to-end fine-tuning or from-scratch training of a classifier (``finetune`` console script)."""
