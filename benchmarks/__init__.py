"""Latency, memory and image-agreement measurement against the PyTorch baselines."""
