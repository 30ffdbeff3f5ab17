"""Layer 1: rows -> rendered prompts -> tokens with label masks -> batches. Pure functions of rows and a
tokenizer."""
