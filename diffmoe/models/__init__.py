from .dit import DiT, DiTOutput, build_model

__all__ = ["DiT", "DiTOutput", "build_model"]
