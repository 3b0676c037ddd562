"""The STELLAR model: encoder + sparse tokens, factorization, decoder, clustering heads.

    build_model(cfg) -> Stellar            from the `model:` config section (unknown keys raise)
    load_official(path_or_state_dict)      from a checkpoint in the public release's layout
"""
from .official import load_official
from .stellar import DEFAULT_CONFIG, LOSS_NAMES, Stellar, resolve_config


def build_model(cfg: dict | None = None, tokenizer=None) -> Stellar:
    """A fresh :class:`Stellar` from the `model:` config dict (keys and defaults: DEFAULT_CONFIG).

    ``tokenizer``: optional frozen module images -> code ids for the token head (otherwise
    ``model.decoder.tokenizer`` names a MaskGIT-VQGAN weights file).
    """
    return Stellar(cfg, tokenizer=tokenizer)


__all__ = ["build_model", "load_official", "Stellar", "DEFAULT_CONFIG", "LOSS_NAMES", "resolve_config"]
