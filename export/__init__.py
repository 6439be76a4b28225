"""PyTorch → ONNX. Importing this package is cheap: torch is imported by the submodules that need it."""
