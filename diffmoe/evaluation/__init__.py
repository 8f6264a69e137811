"""Evaluation: FID/KID/precision-recall on the packaged FID Inception, threshold sweeps, and
capacity analysis plots (paper §4, §5 and §7)."""
