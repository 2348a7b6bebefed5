"""Shared code of the Qwen3 medical R1 fine-tuning scripts."""
