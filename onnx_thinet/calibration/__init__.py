"""Calibration engine: onnxruntime sessions, batching, and the statistics the solvers need."""
