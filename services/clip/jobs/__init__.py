"""Clip jobs: the model callers see, running one, and the embedded and distributed queues."""
