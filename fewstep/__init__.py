"""fewstep: distill diffusion and flow-matching models into 1-4 step samplers."""

__version__ = "0.1.0"
