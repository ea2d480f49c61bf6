"""Reaching users: Hugging Face transformers and the environment-variable opt-in live here."""
