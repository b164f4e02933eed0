"""Quantized frozen base models with trainable PEFT LoRA adapters; streaming loader; adapter-delta
numerics and LoRA rank helpers; the shipped data sets and their readers; ONNX export
(`quantization.export`)."""

from quantization.third_party_noise import silence_known_noise

silence_known_noise()
