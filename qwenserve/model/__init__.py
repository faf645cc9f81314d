"""The Qwen (v1) model: config, tokenizer, chat template, layers, loader, checkpoint maker."""
