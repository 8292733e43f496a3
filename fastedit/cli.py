"""The ``fastedit`` command line: ``fastedit demo``, ``evaluate``, ``tune``, ``sequential`` and ``backends``.

User errors. A mistake in the command line or in what it points to prints exactly one line on
stderr, ``fastedit COMMAND: error: WHAT``, and exits with code 2, without a traceback: a value
argparse rejects (an unknown choice, a count that is not a positive integer, an unparsable list),
an unknown editor or ``--params`` prefix, a hyper-parameter out of its range, a missing or
unreadable ``--weights`` file (a corrupt one too), a missing ``--data-dir`` or dataset file, an
``--out`` that cannot be created or written. All of these are checked before the run (the output
folder is created and a probe file written and removed first), except what only reading the data
or the checkpoint into the model can tell (a checkpoint that does not fit the architecture, a
corrupt dataset file): a ``ValueError`` or ``OSError`` raised while the data are loaded or the model
is built is reported the same way when it happens. Any other exception is a bug and keeps its
traceback. ``--debug`` (before or after the command name) turns the one-line reports off: the error
propagates with its traceback (exit code 1, as for any uncaught exception).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shlex
import sys
import tempfile
import warnings

from . import __version__

EDITOR_CHOICES = ["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"]
MODEL_CHOICES = ["small_cnn", "mlp", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56"]
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")  # pretrained only: --weights needed
USAGE_ERROR = 2  # the exit code of a user error


class UsageError(Exception):
    """A mistake in the command line or in the files and folders it names. :func:`main` prints it
    as one line on stderr (``PROG: error: MESSAGE``) and returns :data:`USAGE_ERROR`."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with its errors raised as one-line :class:`UsageError` (argparse prints
    the usage block first, then exits)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


# ------------------------------------------------------------------------------------------------
# argparse types: each rejects a bad value with a message naming what it expects


def _count(text: str) -> int:
    """A count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed: an integer in [0, 2^63 - 2] (torch's generators take at most 2^64 - 1; tune uses seed + 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value <= 2 ** 63 - 2:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63 - 2], got {value}")
    return value


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def _factor_above_one(text: str) -> float:
    value = _number(text, "a number > 1")
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be > 1, got {text!r}")
    return value


def _number_list(positive: bool):
    """A comma-separated list of finite numbers (each > 0 when ``positive``), at least one."""
    def parse(text: str) -> list[float]:
        items = [item.strip() for item in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}")
        values = []
        for i, item in enumerate(items, 1):
            if not item:
                raise argparse.ArgumentTypeError(f"item {i} of {text!r} is empty (expected numbers separated "
                                                 "by single commas)")
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or (positive and value <= 0):
                raise argparse.ArgumentTypeError(f"item {i} of {text!r}, {item!r}, is not a "
                                                 f"{'positive ' if positive else ''}finite number")
            values.append(value)
        return values
    return parse


# ------------------------------------------------------------------------------------------------
# Checks that run before a command's work starts


def _one_line(message: str) -> str:
    """``message`` on one line: terminal colour codes removed, every run of whitespace one space."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())


def _check_out(out) -> pathlib.Path:
    """Create the output folder (and its parents) and write and remove a probe file in it, so that
    an output folder that cannot be written stops the command before its run, not after it."""
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastedit-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write into the folder ({exc.strerror or exc})") from exc
    return path


def _check_data(args: argparse.Namespace) -> None:
    """The data folder exists (for every dataset but the bundled digits, and whenever --data-dir is
    given), and a dataset without a training split comes with --weights."""
    if args.data != "digits" or args.data_dir is not None:
        folder, source = args.data_dir, "--data-dir"
        if folder is None:
            folder, source = os.environ.get("FASTEDIT_DATA") or None, "$FASTEDIT_DATA"
        if folder is None:
            raise UsageError(f"--data {args.data} needs --data-dir (or $FASTEDIT_DATA): the folder holding "
                             "cifar10/ and mnist/")
        path = pathlib.Path(folder).expanduser()
        if not path.exists():
            raise UsageError(f"{source} {folder}: no such folder")
        if not path.is_dir():
            raise UsageError(f"{source} {folder} is not a folder")
    if args.model in CIFAR_RESNETS and args.weights is None:
        raise UsageError(f"--model {args.model} needs --weights (a pretrained checkpoint such as "
                         "resnet20-12fca82f.th)")
    if args.weights is None and args.data.startswith("cifar10"):
        raise UsageError(f"--data {args.data} provides test images only, nothing to train {args.model} on: "
                         "pass --weights")


def _checkpoint_problem(path: str, exc: Exception) -> str:
    """One line on why ``path`` is no checkpoint fastedit reads. torch.load's own message is not
    repeated: its advice to pass weights_only=False (running the file's pickled code) does not apply,
    fastedit only reads state dicts of tensors."""
    cause = exc.__cause__
    if cause is None:  # torch read it, but it is no state dict: fastedit's message says what it holds
        return f"--weights: {exc}"
    text = _one_line(str(cause))
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:
        return (f"--weights {path} holds pickled Python objects ({pickled.group(1)}), not only tensors (a model "
                "saved whole with torch.save(model)?); fastedit reads state dicts: save model.state_dict()")
    if os.path.getsize(path) == 0:
        return f"--weights {path} is an empty file, not a PyTorch checkpoint"
    # torch's zip reader says what is wrong in its first sentence; the unpickler's errors on other
    # files ("invalid load key", "pop from empty list") tell a user nothing
    detail = text.split(". ")[0] if isinstance(cause, RuntimeError) and "weights_only" not in text else ""
    return (f"--weights {path} is not a readable PyTorch checkpoint (corrupt, truncated or another format"
            + (f": {detail}" if detail else "") + ")")


def _check_weights(weights) -> None:
    """``--weights`` names a file that torch.load reads as a state dict of tensors (read once here,
    before the run; whether it fits the model is seen when the model is built)."""
    if weights is None:
        return
    path = pathlib.Path(weights)
    if not path.exists():
        raise UsageError(f"--weights {weights}: no such file")
    if not path.is_file():
        raise UsageError(f"--weights {weights} is not a file")
    from .models import read_state_dict
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then rejects
            read_state_dict(path)
    except OSError as exc:
        raise UsageError(f"--weights {weights}: cannot read the file ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise UsageError(_checkpoint_problem(str(weights), exc)) from exc


def _check_params(args: argparse.Namespace) -> str:
    """``--params`` (or the model's default) selects parameters of the architecture, checked on a
    model built on the meta device (no memory, no weights); returns the selection."""
    import torch

    from .demo import DEFAULT_PARAMS
    from .models import get_model
    from .selection import select_parameters

    if args.params is not None and not args.params.strip():
        raise UsageError("--params is empty: give a module-name prefix such as 'layer3'")
    params = args.params or DEFAULT_PARAMS.get(args.model, "layer3")
    kwargs = {"in_features": 64} if args.model == "mlp" else {}
    if args.model in ("small_cnn", "resnet18"):
        kwargs = {"in_channels": 1}
    with torch.device("meta"):  # parameter names do not depend on channels or classes
        model = get_model(args.model, num_classes=10, **kwargs)
    try:
        select_parameters(model, params)
    except ValueError as exc:
        raise UsageError(f"--params {params!r}: {str(exc).removeprefix('params: ')}") from exc
    return params


def _make_editor(name: str, options: dict[str, str], **hparams):
    """``make_editor(name, **hparams)`` with a bad hyper-parameter reported as a UsageError naming its
    option (``options``: hyper-parameter -> option, e.g. ``{"lr": "--lrs"}``)."""
    from .editors import make_editor

    known = make_editor(name).hyperparameter_names
    for key in hparams:
        if key not in known:
            raise UsageError(f"{options.get(key, key)}: the {name} editor has no hyper-parameter {key!r} "
                             f"(it has {', '.join(known)})")
    try:
        return make_editor(name, **hparams)
    except (ValueError, TypeError) as exc:
        given = ", ".join(f"{options.get(k, k)} {v:g}" for k, v in hparams.items())
        raise UsageError(f"{given}: {exc}") from exc


def _demo_editors(text: str) -> tuple[str, ...]:
    from .demo import EDITOR_ORDER

    if text == "all":
        return EDITOR_ORDER
    editors = tuple(e.strip() for e in text.split(","))
    if not all(editors):
        raise UsageError(f"--editors {text!r}: an empty name (expected names separated by single commas, "
                         f"or 'all')")
    unknown = [e for e in editors if e not in EDITOR_ORDER]
    if unknown:
        raise UsageError(f"--editors: unknown editor(s) {unknown}; choose from {', '.join(EDITOR_ORDER)} or 'all'")
    repeated = sorted({e for e in editors if editors.count(e) > 1})
    if repeated:
        raise UsageError(f"--editors names {repeated} more than once")
    return editors


def _check_inputs(args: argparse.Namespace) -> str:
    """The checks every model-and-data command runs before its work: data folder, weights, --params
    (returned, defaults applied). The output folder is checked last, by the caller."""
    _check_data(args)
    _check_weights(args.weights)
    return _check_params(args)


def _reading_inputs(exc: BaseException) -> bool:
    """Whether ``exc`` is a ValueError or OSError raised while the data were loaded or the model was
    built from its checkpoint (a frame of those functions is on its traceback): bad input files,
    reported in one line, not a bug."""
    if not isinstance(exc, (ValueError, OSError)):
        return False
    from . import demo, models
    from .data import registry

    codes = {registry.load_dataset.__code__, demo.load_demo_data.__code__, models.get_model.__code__}
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False


# ------------------------------------------------------------------------------------------------
# The commands


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_editors, run_demo

    editors = _demo_editors(args.editors)
    try:
        build_editors(_setting(args.model), editors, args.lr)
    except ValueError as exc:
        raise UsageError(f"--lr {args.lr:g}: {exc}") from exc
    _check_inputs(args)
    _check_out(args.out)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = run_demo(model_name=args.model, weights=args.weights, data=args.data, data_dir=args.data_dir,
                      num_edits=args.edits, max_steps=args.max_steps, params=args.params, editors=editors,
                      lr=args.lr, out=args.out, seed=args.seed, epochs=args.epochs, limit=args.limit,
                      progress=not args.no_progress)
    _record_command(f"{args.out}/results.json")  # the exact command next to the numbers it produced
    return 0 if result["rows"] else 1


def _record_command(path) -> None:
    import pathlib
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node {world} -m fastedit " if world > 1 else "fastedit "
    data["command"] = launcher + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path.write_text(json.dumps(data, indent=2))


def _editor_from_args(args, setting: str):
    from .demo import default_hparams

    hp = dict(default_hparams()[setting].get(args.editor, {}))
    if args.lr is not None:
        hp["lr"] = args.lr
    if getattr(args, "beta", None) is not None:
        hp["beta"] = args.beta
    return _make_editor(args.editor, {"lr": "--lr", "beta": "--beta"}, **hp)


def _setting(model_name: str) -> str:
    return "small" if model_name in ("small_cnn", "mlp") else "resnet"


def _pick_edits(x, y, n: int, num_classes: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=gen)[:min(n, x.shape[0])]
    return x[pick], torch.randint(0, num_classes, (len(pick),), generator=gen), y[pick]


def _init_distributed() -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on the CPU, NCCL on GPUs)
    so evaluate/tune shard their edits; returns this process's rank (0 without torchrun)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank()


def _speed_kwargs(args: argparse.Namespace) -> dict:
    return {"strategy": args.strategy, "edits_per_group": args.edits_per_group, "batch_size": args.batch_size,
            "cache_budget": args.cache_budget_mb * 2 ** 20, "compile": _COMPILE[args.compile]}


_COMPILE = {"off": False, "on": True, "auto": "auto"}


def report_summary(report) -> str:
    """The numbers of an :class:`~fastedit.EvalReport` in one line; non-finite edits are named."""
    line = (f"base error {100 * report.base_error:.2f}%, drawdown {100 * report.drawdown:.2f}%, success "
            f"{100 * report.success_rate:.1f}%, mean steps {report.mean_steps:.2f}, flip rate "
            f"{100 * report.flip_rate:.2f}%")
    if report.num_nonfinite:
        line += f", {report.num_nonfinite} of {report.num_edits} edits non-finite (NaN/inf; counted as failed)"
    return line


def _evaluate(args: argparse.Namespace) -> int:
    from .data import CIFAR10_CLASSES
    from .demo import prepare_model_and_data
    from .evaluate import evaluate
    from .plots import plot_edit_tsne, plot_per_class_drawdown

    editor = _editor_from_args(args, _setting(args.model))
    params = _check_inputs(args)
    out = _check_out(args.out)
    rank = _init_distributed()
    model, dataset, num_classes, _ = prepare_model_and_data(
        args.model, args.weights, args.data, args.data_dir, limit=args.limit, epochs=args.epochs, seed=args.seed)
    x, y = dataset.test
    x_e, y_e, true_e = _pick_edits(x, y, args.edits, num_classes, args.seed)
    report = evaluate(model, (x_e, y_e), (x, y), editor=editor, params=params, max_steps=args.max_steps,
                      edit_labels=true_e, keep_kl_vectors=True, progress=not args.no_progress,
                      **_speed_kwargs(args))
    if rank != 0:  # every rank holds the whole report; one writes it
        return 0
    report.to_json(out / "report.json")
    report.to_csv(out / "edits.csv")
    _record_command(out / "report.json")
    names = CIFAR10_CLASSES if args.data.startswith("cifar10") else None
    plot_per_class_drawdown(report, out / "per_class_drawdown.png", class_names=names)
    if report.num_edits >= 5:
        plot_edit_tsne(report, out / "edit_tsne.png", class_names=names)
    print(f"{editor!r} on {args.model}, {report.num_edits} edits of {params!r}, control {report.num_control}: "
          + report_summary(report))
    print(f"wrote {out}/report.json, edits.csv, per_class_drawdown.png" + (", edit_tsne.png" if report.num_edits >= 5 else ""))
    return 0


def _training_pool(args: argparse.Namespace, dataset, limit: int | None):
    """(images, labels) of the training split and where they come from: the data the model was
    trained on here, or for pretrained CIFAR models the dataset's training images (disjoint from the
    test images the commands edit and measure)."""
    if dataset.train is not None:
        return dataset.train, "the training split"
    from . import data as fdata
    xt, yt = fdata.load_dataset(args.data, args.data_dir, split="train", limit=limit)
    return (fdata.to_float_tensor(xt, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD), yt), "training images"


def _tune(args: argparse.Namespace) -> int:
    from .demo import prepare_model_and_data
    from .editors import make_editor
    from .tuning import tune

    grid = {"lr": args.lrs}
    if args.betas:
        grid["beta"] = args.betas
    for lr in grid["lr"]:
        for beta in grid.get("beta", [None]):
            _make_editor(args.editor, {"lr": "--lrs", "beta": "--betas"},
                         **({"lr": lr} if beta is None else {"lr": lr, "beta": beta}))
    params = _check_inputs(args)
    out = _check_out(args.out)
    rank = _init_distributed()
    model, dataset, num_classes, _ = prepare_model_and_data(
        args.model, args.weights, args.data, args.data_dir, limit=args.limit, epochs=args.epochs, seed=args.seed)
    pool, source = _training_pool(args, dataset, args.tune_pool)
    x_e, y_e, _ = _pick_edits(*pool, args.tune_edits, num_classes, args.seed + 1)
    result = tune(model, (x_e, y_e), dataset.test, editor=make_editor(args.editor, **{"lr": grid["lr"][0]}),
                  params=params, max_steps=args.max_steps, grid=grid, min_success=args.min_success,
                  refine=args.refine, resolution=args.resolution, progress=not args.no_progress,
                  **_speed_kwargs(args))
    if rank != 0:
        return 0
    (out / "tune.json").write_text(json.dumps({**result.to_dict(), "tuning_edits_from": source}, indent=2))
    result.to_csv(out / "tune.csv")
    _record_command(out / "tune.json")
    print(f"{len(result.table)} settings on {len(x_e)} tuning edits from {source}; chosen: {result.editor!r} "
          f"(drawdown {100 * result.report.drawdown:.2f}%, success {100 * result.report.success_rate:.1f}%"
          f"{'' if result.feasible else ', NO setting reached the success target'})")
    print(f"wrote {out}/tune.json, tune.csv")
    return 0


def _trust_region(text: str):
    kind, sep, radius = text.partition(":")
    if not sep or kind not in ("l2", "linf"):
        raise argparse.ArgumentTypeError(f"expected l2:RADIUS or linf:RADIUS, got {text!r}")
    return kind, _positive_float(radius)


def _sequential(args: argparse.Namespace) -> int:
    import torch

    from .demo import prepare_model_and_data
    from .sequential import evaluate_sequential

    editor = _editor_from_args(args, _setting(args.model)) if args.method != "surgery" or args.lr else None
    if args.method == "surgery" and args.budget is None:
        raise UsageError("--method surgery needs --budget (changed scalars per edit)")
    params = _check_inputs(args)
    out = _check_out(args.out)
    model, dataset, num_classes, _ = prepare_model_and_data(
        args.model, args.weights, args.data, args.data_dir, limit=args.limit, epochs=args.epochs, seed=args.seed)
    x, y = dataset.test
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(x.shape[0], generator=gen)
    n_edits = min(args.edits, x.shape[0] - 1)
    pick, rest = order[:n_edits], order[n_edits:]
    if args.control is not None:
        rest = rest[:args.control]
    edits = (x[pick], torch.randint(0, num_classes, (n_edits,), generator=gen))
    fisher = None
    if args.method == "ewc":
        from .baselines import fisher_diagonal
        pool, _ = _training_pool(args, dataset, args.fisher_samples)
        fisher = fisher_diagonal(model, (pool[0][:args.fisher_samples], pool[1][:args.fisher_samples]), params=params)
    every = args.every or max(1, n_edits // 20)
    report = evaluate_sequential(
        model, edits, (x[rest], y[rest]), editor=editor, params=params, max_steps=args.max_steps, method=args.method,
        checkpoints=range(0, n_edits + 1, every), recheck=args.recheck, trust_region=args.trust_region,
        budget=args.budget, fisher=fisher, ewc_lambda=args.ewc_lambda, batch_size=args.batch_size,
        progress=not args.no_progress)
    report.to_json(out / "report.json")
    report.to_csv(out / "checkpoints.csv")
    _record_command(out / "report.json")
    report.plot(out / "sequential.png", title=f"{args.model}, {args.method}, {n_edits} sequential edits")
    f = report.final
    until = report.edits_until()
    print(f"{args.method} on {args.model}, {n_edits} sequential edits of {params!r}, control {report.num_control}: "
          f"drawdown {100 * f['drawdown']:.2f}%, retention {100 * f['retention']:.1f}%, success "
          f"{100 * f['success_rate']:.1f}%, flip rate {100 * f['flip_rate']:.2f}%, {f['changed_scalars']} scalars changed; "
          + (f"1 point of accuracy or 5% retention lost after {until} edits" if until is not None
             else "within 1 point of accuracy and 95% retention throughout"))
    print(f"wrote {out}/report.json, checkpoints.csv, sequential.png")
    return 0


def _backends(args: argparse.Namespace) -> int:
    from .ops import backends

    info = backends()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    forced = info["forced"]
    print(f"fastedit {__version__}; backend priority: {' > '.join(info['order'])}"
          + (f"; forced by FASTEDIT_BACKEND={forced}" if forced else ""))
    for name, st in info["backends"].items():
        state = "usable" if st["usable"] else f"unusable: {st['reason']}"
        ops = f" (ops: {', '.join(st['ops'])})" if st["ops"] else ""
        print(f"  {name:<10} {state}{ops}")
    if info["extension"]:
        print("extension build: " + ", ".join(f"{k}={v}" for k, v in info["extension"].items()))
    return 0


def _add_model_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_cnn", choices=MODEL_CHOICES, help="model architecture")
    p.add_argument("--weights", default=None, help="checkpoint to load (required for resnet20..56); "
                   "without it the model is trained on the data's training split")
    p.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10", "cifar10-lossless", "cifar10-jpeg"],
                   help="dataset; cifar10 picks the first available of the pickle folder, the lossless "
                   "1,017-image npz and the JPEG zip")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: $FASTEDIT_DATA)")
    p.add_argument("--params", default=None, help="editable parameters: a module-name prefix "
                   "(default: 'head' for small_cnn, 'classifier' for mlp, 'layer3' for ResNets)")
    p.add_argument("--max-steps", type=_count, default=10, help="editor steps per edit (the paper's k)")
    p.add_argument("--epochs", type=_count, default=30, help="training epochs when no --weights are given")
    p.add_argument("--limit", type=_count, default=None, help="use only the first N test images")
    p.add_argument("--seed", type=_seed, default=0, help="seed for training, edit choice and labels")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap", "measure"],
                   help="edits one after another (loop), side by side under torch.func.vmap, or measure both "
                        "on the first group; auto: loop on the CPU, measure elsewhere")
    p.add_argument("--edits-per-group", type=_count, default=None, help="edits processed together (default: 1 for "
                   "loop, 16 for vmap)")
    p.add_argument("--batch-size", type=_count, default=256, help="control images per forward pass")
    p.add_argument("--cache-budget-mb", type=_nonnegative_float, default=2048,
                   help="memory for the control set's cached prefix activations; beyond it they are recomputed")
    p.add_argument("--compile", default="off", choices=list(_COMPILE),
                   help="edit steps through torch.compile (auto: on CUDA with at least 32 edits)")


def _add_editor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--editor", default="rmsprop", choices=EDITOR_CHOICES, help="update rule")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: the calibrated demo value)")
    p.add_argument("--beta", type=float, default=None, help="RMSProp's beta")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastedit",
        description="fastedit: fast, exact editing of trained PyTorch models (Editable Neural Networks, "
                    "Sinitsin et al. 2020). Subcommands print tables and write JSON/CSV/PNG results.")
    parser.add_argument("--version", action="version", version=f"fastedit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="edit a model with all six editors and print the paper's Table 1",
        description="Train (or load) a classifier, apply N independent edits (held-out images with random "
                    "target labels) with GD, Scaled GD, RProp, RMSProp, Momentum and Adam, and report for each: "
                    "drawdown (increase of test error), success rate within k steps, mean steps, flip rate "
                    "(share of test predictions changed). Default: scikit-learn digits and a small CNN, no "
                    "download. Example on real CIFAR-10: fastedit demo --model resnet20 --weights "
                    "$FASTEDIT_MODELS/resnet20-12fca82f.th --data cifar10 --data-dir $FASTEDIT_DATA",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(demo)
    demo.add_argument("--edits", type=_count, default=200, help="number of independent edits")
    demo.add_argument("--editors", default="all", help="comma-separated subset of gd,scaled_gd,rprop,rmsprop,momentum,adam")
    demo.add_argument("--lr", type=_positive_float, default=None, help="one learning rate for every editor "
                      "(default: per-editor values in fastedit/demo.py)")
    demo.add_argument("--out", default="runs/demo", help="output folder for results.json, results.csv, editors.png")
    demo.add_argument("--threads", type=_count, default=None, help="torch intra-op threads (default: torch's)")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser(
        "evaluate", help="the paper's protocol for one editor, with per-class drawdown and t-SNE figures",
        description="Apply N independent edits (test images with random target labels) with one editor; report "
                    "drawdown, success rate, mean steps, flip rates and KL on the whole test set; write report.json, "
                    "edits.csv, the per-class drawdown heatmap (paper Figure 2) and a t-SNE of the edits' "
                    "per-sample KL vectors.",
        epilog="Under torchrun (e.g. `torchrun --nproc-per-node 2 -m fastedit evaluate ...`) the edits are "
               "sharded across the processes and rank 0 writes the same report a single process would.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(ev)
    _add_editor_args(ev)
    ev.add_argument("--edits", type=_count, default=200, help="number of independent edits")
    ev.add_argument("--out", default="runs/evaluate", help="output folder")
    _add_speed_args(ev)
    ev.set_defaults(func=_evaluate)

    tu = sub.add_parser(
        "tune", help="search an editor's learning rate (and beta) by the paper's protocol",
        description="Evaluate a grid of hyper-parameters on tuning edits taken from TRAINING images (disjoint from "
                    "the test images that evaluate/demo edit), refine the learning rate around the best one (--refine), and "
                    "choose the least drawdown among the settings whose success rate within --max-steps reaches "
                    "--min-success. Writes tune.json and tune.csv (every setting tried).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(tu)
    tu.add_argument("--editor", default="rmsprop", choices=EDITOR_CHOICES, help="the editor to tune")
    tu.add_argument("--lrs", type=_number_list(positive=True), default="1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1",
                    help="comma-separated learning rates")
    tu.add_argument("--betas", type=_number_list(positive=False), default=None,
                    help="comma-separated betas to search too (RMSProp)")
    tu.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                    help="after the grid, refine lr (per beta) by bracketing and golden-section search")
    tu.add_argument("--resolution", type=_factor_above_one, default=1.2,
                    help="the refinement stops when the chosen lr's neighbours are within this factor")
    tu.add_argument("--tune-edits", type=_count, default=100, help="number of tuning edits")
    tu.add_argument("--tune-pool", type=_count, default=None,
                    help="load at most this many training images for tuning edits")
    tu.add_argument("--min-success", type=_fraction, default=0.95, help="required success rate within --max-steps")
    tu.add_argument("--out", default="runs/tune", help="output folder")
    _add_speed_args(tu)
    tu.set_defaults(func=_tune)

    sq = sub.add_parser(
        "sequential", help="apply many edits one after another and measure the drift, retention and drawdown",
        description="Apply N edits (test images with random target labels) IN ORDER to one copy of the model, each "
                    "on the model the previous ones left, and measure at checkpoints against the original model: "
                    "drawdown and flip rate on the other test images, retention of the earlier edits, success and "
                    "changed parameters. Writes report.json, checkpoints.csv and sequential.png (drawdown and "
                    "retention against the edits applied).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(sq)
    _add_editor_args(sq)
    sq.add_argument("--edits", type=_count, default=200, help="number of sequential edits")
    sq.add_argument("--control", type=_count, default=None, help="control images (default: every test image not edited)")
    sq.add_argument("--method", default="edit", choices=["edit", "surgery", "ewc"], help="how each edit is made")
    sq.add_argument("--budget", type=_count, default=None, help="surgery: changed scalars per edit")
    sq.add_argument("--ewc-lambda", type=_nonnegative_float, default=1.0, help="ewc: the penalty weight")
    sq.add_argument("--fisher-samples", type=_count, default=1000, help="ewc: training images for the Fisher")
    sq.add_argument("--recheck", type=int, default=0, help="re-edit up to this many broken earlier edits after each edit")
    sq.add_argument("--trust-region", type=_trust_region, default=None,
                    help="l2:RADIUS or linf:RADIUS around the original parameters")
    sq.add_argument("--every", type=_count, default=None, help="edits between checkpoints (default: N/20)")
    sq.add_argument("--batch-size", type=_count, default=256, help="images per forward pass")
    sq.add_argument("--out", default="runs/sequential", help="output folder")
    sq.set_defaults(func=_sequential)

    be = sub.add_parser("backends", help="show which kernel backends are usable here, and why not",
                        description="List the kernel backends (cuda, triton, cpu, reference) in priority order, "
                                    "whether each is usable on this machine and why not, and the compiled "
                                    "extension's build information. FASTEDIT_BACKEND forces one backend.")
    be.add_argument("--json", action="store_true", help="print JSON")
    be.set_defaults(func=_backends)
    for command in (demo, ev, tu, sq, be):  # --debug after the command too; not given, it keeps the main one's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of a user error instead of its one-line message")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0 done,
    1 when the demo produced no result, 2 (:data:`USAGE_ERROR`) for a user error, printed as one line
    on stderr (see the module docstring; with ``--debug`` the error is raised instead)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # an error argparse finds comes before --debug is parsed
    prog = "fastedit"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        if not getattr(args, "func", None):
            raise UsageError("no command given: choose demo, evaluate, tune, sequential or backends (see fastedit --help)")
        prog = f"fastedit {args.command}"
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        message, where = str(exc), exc.prog or prog
    except (ValueError, OSError) as exc:
        if debug or not _reading_inputs(exc):
            raise
        message, where = str(exc), prog
    print(f"{where}: error: {_one_line(message)}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
