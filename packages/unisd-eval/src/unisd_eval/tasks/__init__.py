"""The benchmark tasks of the method, one module per family."""

from .gsm8k import GSM8KTask
from .humaneval import HumanEvalTask
from .mbpp import MBPPFullTask, MBPPTask
from .mcqa import CosETask, GPQADiamondTask, GPQATask, MedMCQATask, ScienceQATask
from .tooluse import ToolUseTask

ALL_TASKS = (
    MBPPTask, MBPPFullTask, HumanEvalTask, ScienceQATask, CosETask, MedMCQATask, GPQATask, GPQADiamondTask,
    GSM8KTask, ToolUseTask,
)

__all__ = [
    "ALL_TASKS", "CosETask", "GPQADiamondTask", "GPQATask", "GSM8KTask", "HumanEvalTask", "MBPPFullTask", "MBPPTask", "MedMCQATask",
    "ScienceQATask", "ToolUseTask",
]
