"""Data: text sources, tokenized corpora and batches."""
