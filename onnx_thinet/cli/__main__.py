"""`python -m onnx_thinet.cli`: the same as the `onnx-thinet` command."""

from onnx_thinet.cli.main import main

main()
