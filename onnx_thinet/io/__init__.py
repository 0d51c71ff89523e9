"""Graph I/O and canonicalization: load (checked), shape inference, simplify, atomic save, calibration data."""
