"""Quantized frozen base models with trainable PEFT LoRA adapters; streaming loader; export."""
