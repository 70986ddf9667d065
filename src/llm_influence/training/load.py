"""Load the model of a run directory with the adapter of one of its checkpoints."""

from __future__ import annotations

from ..config import TrainArgs
from ..errors import UserError
from ..models.formatting import ChatFormatter
from ..models.lora import load_adapter
from ..models.registry import load_model
from ..rundir import RunDir
from .state import verify_checkpoint


def load_finetuned(run: RunDir, checkpoint: str = "last", *, trainable: bool = False,
                   trust_remote_code: bool = False):
    """``(peft_model, formatter, checkpoint_name)`` for ``checkpoint`` (``epoch-N`` or ``last``).

    The formatter uses the run's ``max_length`` and ``loss_on``, so features and generation
    see exactly the tokens that training saw. The checkpoint's files must match the SHA-256
    recorded when it was written (a truncated or modified adapter is refused, never used);
    an adapter-only folder without trainer state is accepted if its files read.
    """
    cfg = run.config()
    if "finetune" not in cfg:
        raise UserError(f"{run.config_path}: no 'finetune' section; fine-tune the run first")
    cfg = cfg["finetune"]
    # epoch-0 (the freshly initialised adapter, B = 0) is loadable but never "last".
    name = "epoch-0" if checkpoint == "epoch-0" and 0 in run.epochs() else run.resolve_checkpoints(checkpoint)[0]
    folder = run.checkpoints_root / name
    kind, reason = verify_checkpoint(folder, need_state=False)
    if kind is not None:
        raise UserError(f"{folder}: {reason}; re-run `llm-influence finetune` with the same arguments "
                        "to recompute it")
    base, tokenizer, _ = load_model(cfg["model"], trust_remote_code=trust_remote_code)
    model = load_adapter(base, folder, trainable=trainable)
    args = TrainArgs(**cfg["train"])
    formatter = ChatFormatter(tokenizer, max_length=args.max_length, loss_on=args.loss_on)
    model.eval()
    return model, formatter, name
