"""The fleet simulator (`schoolfl coordinator simulate`): a fleet of schools, a proxy trainer
with real PEFT LoRA, the cost-model clock, and the comparison of schedulers."""
