"""The io layer, which every other layer calls to read and write models and data.

graph: load (always checked), atomic save (external data above 2 GB), opset, graph inputs,
canonicalization. feeds: element types and dummy inputs (one rule for symbolic dims).
data: calibration and other arrays (the one .npz reader). files: atomic writes, digests.
"""
