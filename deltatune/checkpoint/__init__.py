"""Saving and loading: atomic file writes and Hugging Face peft-compatible adapter files."""
