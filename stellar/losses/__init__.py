"""STELLAR's losses, one idea per file: clustering (Sinkhorn-Knopp), matching (OT), KoLeo,
reconstruction. Each runs in fp32 with autocast off."""
from .clustering import sinkhorn_knopp, soft_cross_entropy
from .koleo import koleo_loss
from .matching import match_tokens, transport_plan
from .reconstruction import pixel_loss, token_loss

__all__ = ["sinkhorn_knopp", "soft_cross_entropy", "match_tokens", "transport_plan", "koleo_loss",
           "pixel_loss", "token_loss"]
