"""Frozen image encoders whose patch tokens are REPA's alignment target (docs/method.md §9.3).

The trainer builds one by name (:func:`build_encoder`) and hands it to the objective
(:class:`sra.objectives.repa.EncoderAlignObjective`), which never imports this package.
"""

from sra.encoders.base import Encoder
from sra.encoders.registry import (ENCODERS, EncoderSpec, build_encoder, encoder_spec, encoder_width,
                                   register_encoder)

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "build_encoder", "encoder_spec", "encoder_width",
           "register_encoder"]
