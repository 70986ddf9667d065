"""llm-influence: training-data attribution for LoRA-fine-tuned language models.

The data flow is one direction (see DESIGN.md):
task data -> fine-tune -> features -> methods -> scores -> metrics -> report.
"""

__version__ = "0.1.0"
