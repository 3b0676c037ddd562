"""The training harness: layered config, cosine schedule, atomic checkpoints, the pretraining loop.

    from stellar.train import load_config, pretrain
    pretrain(load_config("configs/tiny.yaml", ["train.steps=50"]), "runs/tiny")
"""
from .checkpoint import latest_checkpoint, load_pretrained, resolve_checkpoint, save_checkpoint
from .config import ConfigError, load_config, save_config
from .distributed import RankLostError
from .lock import RunLockedError
from .schedule import CosineSchedule
from .trainer import NonFiniteLossError, RunResult, pretrain, read_metrics

__all__ = ["ConfigError", "CosineSchedule", "NonFiniteLossError", "RankLostError", "RunLockedError", "RunResult",
           "latest_checkpoint", "load_config", "load_pretrained", "pretrain", "read_metrics",
           "resolve_checkpoint", "save_checkpoint", "save_config"]
