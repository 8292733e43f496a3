"""The baselines Editable Neural Networks compares against (Sinitsin et al., 2020, §4.1).

- :mod:`.ewc`: editing with an EWC penalty (diagonal Fisher) in the editor's loss;
- :mod:`.dknn`: Deep k-NN (Papernot & McDaniel, 2018), edited by relabelling nearest neighbours;
- :mod:`.cnp`: Editable+CNP, edits as learned condition vectors added to a chain's output.
"""
from .cnp import CNPEdit, ConditionedModel, ConditionEncoder, cnp_edit, cnp_evaluate, train_cnp
from .dknn import DeepKNN, DkNNEdit, dknn_evaluate
from .ewc import EWCEditResult, ewc_edit, ewc_penalty, fisher_diagonal, run_penalised_loop

__all__ = [
    "fisher_diagonal", "ewc_edit", "EWCEditResult", "ewc_penalty", "run_penalised_loop",
    "DeepKNN", "DkNNEdit", "dknn_evaluate",
    "ConditionEncoder", "ConditionedModel", "train_cnp", "cnp_edit", "CNPEdit", "cnp_evaluate",
]
