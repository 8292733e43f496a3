"""fastedit: fast, exact editing of trained PyTorch models.

Edit a model's behaviour on some inputs in place, atomically and revertibly (:func:`edit`): a class
label, target tokens of a language model, a preferred translation, or any constraint; measure the
side effects of many independent edits (:func:`evaluate`) or of a long sequence of them applied one
after another (:func:`evaluate_sequential`), with the update rules of Editable Neural
Networks (Sinitsin et al., ICLR 2020). Any ``nn.Module`` (HF transformers included) with inputs given
as a tensor, a tuple or a tokenizer's dict. See the README for a quick start.
"""
from . import (
    baselines,  # noqa: E402  (EWC editing, Deep k-NN, Editable+CNP)
    ops,  # noqa: E402  (the kernel ops: editor_step_, editor_step, edit_metrics, edit_constraint)
)
from .constraint import Classification, Constraint, FunctionConstraint, SequenceRanking, TokenTargets
from .edit import EditError, EditResult, PrefixFallbackWarning, edit
from .edit_journal import EditJournal
from .editors import EDITORS, GD, Adam, Editor, Momentum, RMSProp, RProp, ScaledGD, SignGD, make_editor
from .evaluate import EvalReport, evaluate
from .ops import backends
from .selection import select_parameters
from .sequential import SequentialReport, evaluate_sequential
from .sparse_delta import SparseDelta
from .surgery import SurgeryResult, surgery
from .training import EditableTraining, LearnableEditor
from .tuning import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "edit", "EditResult", "EditError", "PrefixFallbackWarning", "evaluate", "EvalReport", "evaluate_sequential",
    "SequentialReport", "tune", "TuneResult",
    "surgery", "SurgeryResult", "SparseDelta", "EditJournal", "EditableTraining", "LearnableEditor",
    "Editor", "GD", "ScaledGD", "RProp", "SignGD", "RMSProp", "Momentum", "Adam", "EDITORS", "make_editor",
    "Constraint", "Classification", "TokenTargets", "SequenceRanking", "FunctionConstraint",
    "select_parameters", "backends", "baselines", "ops", "__version__",
]
