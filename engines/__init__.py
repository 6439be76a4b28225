"""ONNX → engines: precision policy, shape profiles, builders per backend, the engine manifest."""
