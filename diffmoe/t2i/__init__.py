"""Text-to-image: the shapes judge, and sampling and evaluation of text-conditioned checkpoints.
The model is diffmoe/models (the caption embedder in condition.py, the cross-attention in
dit.py); the shapes domain, the text encoder with its embedding cache and the captioned datasets
are in diffmoe/data. docs/text-to-image.md describes the whole."""
