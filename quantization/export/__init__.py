"""Classroom inference: a task model merged and exported to ONNX fp32 + int8, with a
standalone predictor and a report."""
