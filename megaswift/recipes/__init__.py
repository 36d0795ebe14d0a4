"""Self-contained training recipes: data, tokenizer, starting checkpoint and evaluation."""
