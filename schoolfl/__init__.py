"""schoolfl: federated LoRA fine-tuning on quantized models for school hardware.

This small package only holds the `schoolfl` command line, which gathers the command
groups of the four working packages (edge_runtime, coordinator, device_profiles) and the
demo. See README.md and shared DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
