"""sra: Self-Representation Alignment for diffusion transformers (SiT and DiT)."""

__version__ = "0.1.0"
