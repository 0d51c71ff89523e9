"""The PyTorch round trip: ONNX to a readable module, fine-tuning, and back to ONNX."""
