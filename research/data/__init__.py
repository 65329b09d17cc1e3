"""Review data: records, loaders, splits, encoder inputs, tokenizers and batches."""
