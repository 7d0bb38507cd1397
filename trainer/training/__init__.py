"""The training subprocess and the QLoRA recipe it runs."""
