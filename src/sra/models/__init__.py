"""Models: one adaLN-Zero transformer for SiT and DiT, and the registry of names."""

from sra.models.registry import MODEL_NAMES, ModelConfig, model_config, parse_name
from sra.models.transformer import (
    DiffusionTransformer,
    TransformerOutput,
    build_model,
    count_parameters,
)

__all__ = [
    "MODEL_NAMES", "ModelConfig", "model_config", "parse_name", "DiffusionTransformer",
    "TransformerOutput", "build_model", "count_parameters",
]
