"""MAE pretraining: ``python pretrain/main.py`` or ``accelerate launch pretrain/main.py``."""
