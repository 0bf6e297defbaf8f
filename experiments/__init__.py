"""Reproducible studies: run each as `python -m experiments.<name>`."""
