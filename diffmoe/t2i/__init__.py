"""Text-to-image: the shapes domain and its judge, the frozen text encoder with its embedding
cache, captioned datasets, and sampling/evaluation of text-conditioned checkpoints. The model
itself is diffmoe/models/t2i.py; docs/text-to-image.md describes the whole."""
