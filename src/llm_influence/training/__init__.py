"""LoRA fine-tuning with checkpoints, early stopping and resume."""

from .finetune import FinetuneResult, finetune, lr_at, mean_loss

__all__ = ["FinetuneResult", "finetune", "lr_at", "mean_loss"]
