"""Sparse autoencoders: the SAE, its file formats, packs (one SAE per layer and position), the
hub, training, the embedded recipes, evaluation, and the shared scan over a corpus."""
