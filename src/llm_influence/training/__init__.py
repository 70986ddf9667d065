"""LoRA fine-tuning with checkpoints, early stopping and resume."""

from .finetune import FinetuneResult, finetune, lr_at, mean_loss
from .log import read_train_log

__all__ = ["FinetuneResult", "finetune", "lr_at", "mean_loss", "read_train_log"]
