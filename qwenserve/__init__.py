"""qwenserve: a serving engine for the Qwen (v1) model family."""
