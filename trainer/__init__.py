"""The trainer: streams datasets, fine-tunes, exports and packages models. Never serves."""
