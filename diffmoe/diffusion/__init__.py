from .flow import FlowMatching, LossOutput
from .samplers import SAMPLERS, euler, guided_velocity, heun, sample

__all__ = ["FlowMatching", "LossOutput", "SAMPLERS", "euler", "guided_velocity", "heun", "sample"]
