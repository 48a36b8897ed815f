"""Multi-GPU scaling benchmark of MAE pretraining (``python -m bench.scaling``)."""
