"""I/O: checkpoints and their encodings, data sets, ONNX export and serving.

Modules here read and write files; they import the pure modules below them
(`config`, `model`, `train`, `compress`), never the jobs above.
"""
