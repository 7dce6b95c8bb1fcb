"""The task table: what a run's task (``dataset.json``'s ``task``) means to the code that reads the run.

Each task registers itself from its own package with :func:`register_task` (segmentation in
:mod:`medse.training.trainer`, classification in :mod:`medse.classify.train`): how its ``config.yaml`` is read,
which network it builds, what the training engine trains (its :class:`~medse.training.engine.TrainingTask`) and
how a trained run predicts. :class:`medse.runs.Run` looks its task up here by name, so the run folder stands
below the tasks and imports none of them (docs/ARCHITECTURE.md, the import floors in pyproject.toml).

The built-in tasks are found without importing them up front: :data:`BUILTIN_TASKS` names the module that
registers each, and :func:`get_task` imports that module on the first look-up of the name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medse.utils.errors import MedseError
from medse.utils.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from medse.runs import DatasetInfo, Run

__all__ = ["BUILTIN_TASKS", "TaskSpec", "get_task", "list_tasks", "register_task"]

#: built-in task name -> the module whose import registers it
BUILTIN_TASKS: dict[str, str] = {
    "segmentation": "medse.training.trainer",
    "classification": "medse.classify.train",
}


@dataclass(frozen=True)
class TaskSpec:
    """One task, as the code that reads its runs needs it.

    Attributes:
        name: the task's name in ``dataset.json`` (``segmentation``, ``classification``).
        load_config: the run's validated config (its schema's dataclass) from the :class:`~medse.runs.Run`.
        build_model: the untrained network of a config for a run's :class:`~medse.runs.DatasetInfo`.
        training_task: the class the training engine trains (:class:`medse.training.engine.TrainingTask`).
        predict: how a trained run predicts (called with the run folder first), by its dotted name
            (``module:attribute``), imported on use (:meth:`predictor`) so that registering a task does not import
            its inference code.
    """

    name: str
    load_config: Callable[[Run], Any]
    build_model: Callable[[Any, DatasetInfo], nn.Module]
    training_task: type
    predict: str

    def predictor(self) -> Callable[..., Any]:
        """The object :attr:`predict` names (imported now): ``Predictor.from_run`` / ``predict_run``."""
        module, _, attr = self.predict.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


#: the registered tasks (medse's one registry type; a task is the same registration when its training task class
#: is the same, so re-importing a task's module re-registers it in place)
_TASKS: Registry[TaskSpec] = Registry("task", decorator="register_task", owner=lambda spec: spec.training_task)


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the table (one registration per name; registering the same task again replaces it)."""
    return _TASKS.add(_TASKS.check_name(spec.name), spec)


def get_task(name: str) -> TaskSpec:
    """The registered task ``name`` (a built-in one's module is imported on first use); unknown: MedseError."""
    if name not in _TASKS and name in BUILTIN_TASKS:
        importlib.import_module(BUILTIN_TASKS[name])
    if name not in _TASKS:
        raise MedseError(f"unknown task '{name}' (known: {', '.join(list_tasks())})")
    return _TASKS[name]


def list_tasks() -> list[str]:
    """Every task name: the built-in ones and any registered since."""
    return sorted(set(BUILTIN_TASKS) | set(_TASKS))
