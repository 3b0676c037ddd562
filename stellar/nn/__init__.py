"""Drop-in modules: the ViT pieces, the decoder's position encoding and the factorization."""
from .factorization import SpatialSemanticFactorization
from .posenc import RandomFourierPositionEncoding
from .vit import (VIT_PRESETS, Attention, Block, Mlp, PatchEmbed, Transformer, VisionTransformer,
                  vit_preset)

__all__ = ["SpatialSemanticFactorization", "RandomFourierPositionEncoding", "VIT_PRESETS", "Attention",
           "Block", "Mlp", "PatchEmbed", "Transformer", "VisionTransformer", "vit_preset"]
