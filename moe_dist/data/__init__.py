"""Training data: tokenizers, Megatron's indexed datasets, sources and blends, packed per-rank batches."""
