"""Load the model of a run directory with the adapter of one of its checkpoints."""

from __future__ import annotations

from ..config import TrainArgs
from ..models.formatting import ChatFormatter
from ..models.lora import load_adapter
from ..models.registry import load_model
from ..rundir import RunDir


def load_finetuned(run: RunDir, checkpoint: str = "last", *, trainable: bool = False):
    """``(peft_model, formatter, checkpoint_name)`` for ``checkpoint`` (``epoch-N`` or ``last``).

    The formatter uses the run's ``max_length`` and ``loss_on``, so features and generation
    see exactly the tokens that training saw.
    """
    cfg = run.config()["finetune"]
    # epoch-0 (the freshly initialised adapter, B = 0) is loadable but never "last".
    name = "epoch-0" if checkpoint == "epoch-0" and 0 in run.epochs() else run.resolve_checkpoints(checkpoint)[0]
    base, tokenizer, _ = load_model(cfg["model"])
    model = load_adapter(base, run.checkpoints_root / name, trainable=trainable)
    args = TrainArgs(**cfg["train"])
    formatter = ChatFormatter(tokenizer, max_length=args.max_length, loss_on=args.loss_on)
    model.eval()
    return model, formatter, name
