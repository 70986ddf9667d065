"""The paper's analyses of why influence functions fail, as registered studies.

Every study is a function ``(profile, out_dir, data_dir, options) -> StudyResult``
registered by name (:func:`register_study`) and run with :func:`run_study`, which writes
``OUT/NAME.json``, ``OUT/NAME.md`` and the study's PNG figure(s) atomically. Profiles:
``smoke`` (seconds), ``cpu`` (minutes on 2 cores), ``paper`` (the paper's sizes).

| name | paper | module |
|---|---|---|
| ``approximation`` | Table 5, Fig. 3 | :mod:`.approximation` (linear MNIST, no LLM) |
| ``model-size`` | Fig. 7 | :mod:`.model_size` (two-layer linear MNIST, no LLM) |
| ``lissa-iterations`` | Fig. 4 | :mod:`.lissa_iterations` (LiSSA Acc/Cover vs iterations; shared LLM-study helpers) |
| ``convergence`` | Fig. 5 | :mod:`.convergence` (Acc at every epoch next to train/validation loss) |
| ``parameter-change`` | Table 1, Table 6, Fig. 6 | :mod:`.parameter_change` (ASR and LoRA ‖Δθ‖ of benign/harmful/mixed fine-tunes) |
| ``trainable-params`` | Fig. 8 | :mod:`.trainable_params` (Acc with LoRA on fewer layers / other depths) |
| ``backdoor-learning`` | beyond the paper | :mod:`.backdoor_learning` (backdoor compliance and Acc at every checkpoint of backdoor-1) |
| ``paper-gap`` | issue 14 | :mod:`.paper_gap` (one setting at a time toward the paper's: lissa-paper, abs ranking, loss on all, 128 tokens, 15 epochs, middle-layer RepSim) |
| ``counterfactual`` | beyond the paper | :mod:`.counterfactual` (LDS with noise ceiling, leave-top-k-out and tail-patch beside Acc/Cover; retrains on subsets) |

LLM studies register themselves the same way in their own modules, imported here.
"""

from . import (approximation, backdoor_learning, convergence, counterfactual, lissa_iterations,  # noqa: F401
               model_size, paper_gap, parameter_change, trainable_params)  # (registration)
from .base import (PROFILES, StudyResult, StudySpec, available_studies, get_study, jsonable, markdown_table,
                   new_figure, register_study, resolve_options, run_study, save_figure, study_descriptions,
                   unregister_study)

__all__ = [
    "PROFILES", "StudyResult", "StudySpec", "available_studies", "get_study", "jsonable", "markdown_table",
    "new_figure", "register_study", "resolve_options", "run_study", "save_figure", "study_descriptions",
    "unregister_study",
]
