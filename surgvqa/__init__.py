"""surgvqa: LoRA fine-tuning and honest evaluation of Qwen video+audio models on surgical video QA."""
__version__ = "0.1.0"
