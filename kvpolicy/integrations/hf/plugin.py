"""Placeholder: the Hugging Face integration plugin."""
