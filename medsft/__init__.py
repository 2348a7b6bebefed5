"""Shared code of the Qwen3 medical R1 fine-tuning scripts, one module per job."""
from medsft.console import quiet_known_noise

quiet_known_noise()
