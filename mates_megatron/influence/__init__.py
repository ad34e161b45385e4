"""Data influence model: a BERT-style encoder with a regression head, fitted to oracle scores."""
