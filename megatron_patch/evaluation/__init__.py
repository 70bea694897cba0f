"""Zero-shot evaluation of trainer checkpoints (what tools/evaluate.py runs).

- `scoring`: perplexity over a token stream (non-overlapping or sliding windows) and LAMBADA
  last-word accuracy, from any `logits_fn(tokens) -> logits`, so the arithmetic is testable
  without a model.
- `inputs`: token ids from a .bin/.idx prefix or from documents, LAMBADA examples from texts,
  the checkpoint's tokenizer, and the model as a `logits_fn`.
"""
