"""End-to-end orchestration: the bundled demo and the results-table run."""
