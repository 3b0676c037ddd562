"""The STELLAR model: encoder + sparse tokens, factorization, decoder, clustering heads.

    build_model(cfg) -> Stellar            from the `model:` config section (unknown keys raise)
    load_official(path_or_state_dict)      from a checkpoint in the public release's layout
"""
import os

from .official import load_official
from .stellar import DEFAULT_CONFIG, LOSS_NAMES, Stellar, resolve_config


def build_model(cfg: dict | None = None, tokenizer=None, init: bool = True) -> Stellar:
    """A fresh :class:`Stellar` from the `model:` config dict (keys and defaults: DEFAULT_CONFIG).

    ``tokenizer``: optional frozen module images -> code ids for the token head (otherwise
    ``model.decoder.tokenizer`` names a MaskGIT-VQGAN weights file).
    ``init``: with ``model.init: PATH`` set, start the encoder's ViT from that local MAE checkpoint
    (``stellar.model.mae``; an EMA teacher starts as the student). ``init=False`` skips it, for
    callers that load a trained checkpoint over the fresh model anyway.
    """
    model = Stellar(cfg, tokenizer=tokenizer)
    path = model.cfg["init"]
    if init and path is not None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"model.init must be the path of a local MAE checkpoint (or null), got {path!r}")
        from stellar.model.mae import load_mae

        load_mae(model.encoder.vit, path, "model.init")
        if model.teacher is not None:
            model.teacher["encoder"].load_state_dict(model.encoder.state_dict())
    return model


__all__ = ["build_model", "load_official", "Stellar", "DEFAULT_CONFIG", "LOSS_NAMES", "resolve_config"]
