"""``python -m llm_influence``: the command line (:mod:`llm_influence.cli`)."""

import sys

from .cli import main

sys.exit(main())
