"""Offline tools that make and measure engine files: synthetic data, training, ONNX export, FP16/INT8
ONNX builds, TensorRT plans, compiled torch engines, benchmarks, and the `engines` command line.

The worker never imports this package; it may import `engines` (the runtime) and `common`.
"""
