"""The `lcp-solvers` command: offline reproductions of the paper's experiments.

Only the standard library is imported at module level, so that `--help`, a bad
argument or a bad output path answer at once; JAX and the experiments are imported
when a command runs.
"""

import argparse
import json
import os
import pathlib
import sys
import textwrap
from collections.abc import Sequence


_METHODS = ("rbp", "di", "kp", "lf", "ebd")
# The demo's PNG: under an output folder that .gitignore lists, not loose in the
# working directory.
_DEMO_PLOT = "lcp-solvers-output/demo.png"
# Table 2's methods: "bp" is backprop (conv-ff) or recurrent backprop (conv-deq);
# "dropin" is the conv DEQ trained through `LeastControlAdjoint` (conv-deq only);
# "kp" is Kolen-Pollack dynamic inversion (conv-ff only, as in the paper).
_TABLE2_METHODS = ("bp", "dropin", "di", "kp")
_TABLE2_ARCHITECTURES = ("conv-ff", "conv-deq")
_METHOD_NAMES = {
    "rbp": "BP/RBP",
    "bp": "BP/RBP",
    "dropin": "LCP-DI (drop-in)",
    "di": "LCP-DI",
    "kp": "LCP-DI (KP)",
    "lf": "LCP-LF",
    "ebd": "LCP-EBD",
}
# The keys of `_meta.META_METHOD_NAMES`, spelled out so that `--help` does not
# import JAX.
_META_METHODS = ("lcp", "imaml", "fomaml", "reptile", "fomaml-prox", "reptile-prox")


class _Parser(argparse.ArgumentParser):
    # `--help` shows every option's default; argparse exits with status 2 and a
    # usage line on a bad argument: also say where help lives.
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help`.\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number, got {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value}")
    return value


def _norm_limit(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return _positive_float(text)


def _add_training_args(
    p: argparse.ArgumentParser,
    *,
    epochs: int,
    hidden: int,
    hidden_help: str,
    hidden_flag: str = "--hidden",
    recurrent: bool = True,
    alpha: float = 10.0,
):
    p.add_argument(
        "--epochs", type=_positive_int, default=epochs, help="training epochs"
    )
    p.add_argument(hidden_flag, type=_positive_int, default=hidden, help=hidden_help)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help="examples per update (the loss is the mean over the batch)",
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam step size")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help=(
            "constant, or cosine: anneal the step size to a tenth of --lr over the "
            "run, as the paper's code can"
        ),
    )
    p.add_argument(
        "--alpha",
        type=_positive_float,
        default=alpha,
        help=(
            "leak of the output controller, for the per-example loss (the paper's "
            "alpha, for a batch mean, times the batch size: its 0.1 at batch 64 is "
            "6.4 here); EBD uses beta=1/alpha. 0.1 and 1 (stronger control) learn "
            "worse on these small networks, and MNIST-1D needs 100 for DI and EBD "
            "to match BP/RBP: see docs/results.md"
        ),
    )
    if recurrent:
        p.add_argument(
            "--max-recurrent-norm",
            type=_norm_limit,
            default=0.95,
            help=(
                "after every update, rescale the RNN's recurrent weights (and KP's "
                "feedback weights) to at most this spectral norm, for every method, "
                "so that the free dynamics contract; 'none' to switch off"
            ),
        )
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help=(
            "train data-parallel on this many devices (each batch split over them, "
            "the network replicated); --batch-size must be a multiple. On a CPU-only "
            "machine the devices are simulated (XLA's host device count): the "
            "results match one device up to float32 rounding (which can tip a "
            "solve near its step limit, e.g. in LCP-LF), the time does not "
            "improve. See docs/devices.md"
        ),
    )
    p.add_argument(
        "--max-train", type=_positive_int, default=None, help="cap on training examples"
    )
    p.add_argument(
        "--max-test", type=_positive_int, default=None, help="cap on test examples"
    )
    _add_output_args(p)


def _add_output_args(p: argparse.ArgumentParser):
    p.add_argument(
        "--json", metavar="FILE", default=None, help="write the results as JSON here"
    )
    p.add_argument(
        "--plot", metavar="FILE", default=None, help="write a PNG of the curves here"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_runs_args(p: argparse.ArgumentParser, methods: tuple[str, ...]):
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="independent runs per method (seeds 0, 1, ...): mean ± std",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=methods,
        default=list(methods),
        help="which methods to run",
    )


def _version() -> str:
    import importlib.metadata

    try:
        return f"%(prog)s {importlib.metadata.version('lcp-solvers')}"
    except importlib.metadata.PackageNotFoundError:
        return "%(prog)s (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lcp-solvers",
        description=(
            "Offline reproductions of 'The least-control principle for local learning "
            "at equilibrium' (Meulemans et al., NeurIPS 2022). Nothing is downloaded."
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="eqRNN on scikit-learn digits: recurrent backprop vs LCP-DI",
        description=(
            "Train the equilibrium RNN on scikit-learn's 8x8 digits with recurrent "
            "backprop (implicit gradient) and with the least-control principle "
            "(dynamic inversion) side by side; print a table, save a PNG of the "
            "training curves. Columns: final test accuracy, H = the control cost "
            "½‖ψ‖² per example in the last epoch (LCP only), seconds per epoch after "
            "the first (which compiles; n/a with one epoch), and the mean number of "
            "steps of the controlled solve (BP/RBP: of the forward solve)."
        ),
    )
    _add_training_args(
        demo, epochs=15, hidden=64, hidden_help="units of the recurrent network"
    )
    demo.set_defaults(plot=_DEMO_PLOT)
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data split and the network"
    )

    reproduce = sub.add_parser(
        "reproduce",
        help="the paper's comparisons (table1, table2, meta)",
        description="Reproduce one of the paper's comparisons on offline data.",
    )
    rsub = reproduce.add_subparsers(
        dest="experiment", metavar="EXPERIMENT", parser_class=_Parser
    )
    rsub.required = True

    table1 = rsub.add_parser(
        "table1",
        help="BP/RBP vs LCP-DI, LCP-DI (KP), LCP-LF, LCP-EBD for FF and RNN",
        description=(
            "Table 1 of the paper: test accuracy (mean ± std over seeds), seconds per "
            "epoch and mean controlled-solve steps of BP/RBP and the LCP variants, "
            "for the feedforward (2 x hidden) and recurrent (hidden) equilibrium "
            "networks."
        ),
    )
    table1.add_argument(
        "--dataset",
        choices=("digits", "mnist1d", "mnist"),
        required=True,
        help="digits (scikit-learn), mnist1d (generated), or mnist (from --data-dir)",
    )
    table1.add_argument(
        "--data-dir",
        default=None,
        help="directory with mnist.npz or the four MNIST IDX files (for mnist)",
    )
    _add_runs_args(table1, _METHODS)
    table1.add_argument(
        "--architectures",
        nargs="+",
        choices=("ff", "rnn"),
        default=["ff", "rnn"],
        help="feedforward (ff) and/or recurrent (rnn) equilibrium networks",
    )
    _add_training_args(
        table1,
        epochs=30,
        hidden=256,
        hidden_help="units per hidden layer (FF: 2 layers of this size; RNN: one "
        "population)",
    )

    table2 = rsub.add_parser(
        "table2",
        help="BP/RBP vs LCP-DI on a convolutional FF network and a convolutional DEQ",
        description=(
            "Table 2 of the paper: test accuracy (mean ± std over seeds), seconds per "
            "epoch and mean solve steps of a layered convolutional network (conv-ff: "
            "BP, LCP-DI, LCP-DI with Kolen-Pollack feedback through transposed "
            "convolutions) and a convolutional deep equilibrium model (conv-deq: RBP, "
            "LCP-DI through the drop-in LeastControlAdjoint, LCP-DI by the full "
            "principle). digits are scikit-learn's 8x8 images as 1x8x8 inputs, an "
            "offline stand-in for CIFAR-10 (read from --data-dir). The networks use "
            "GELU where the paper's use ReLU (see docs/results.md)."
        ),
    )
    table2.add_argument(
        "--dataset",
        choices=("digits", "cifar10"),
        required=True,
        help="digits (scikit-learn, as 1x8x8 images) or cifar10 (from --data-dir)",
    )
    table2.add_argument(
        "--data-dir",
        default=None,
        help="directory with CIFAR-10's python batches (cifar-10-batches-py)",
    )
    _add_runs_args(table2, _TABLE2_METHODS)
    table2.add_argument(
        "--architectures",
        nargs="+",
        choices=_TABLE2_ARCHITECTURES,
        default=list(_TABLE2_ARCHITECTURES),
        help="the convolutional feedforward network and/or the convolutional DEQ",
    )
    _add_training_args(
        table2,
        epochs=15,
        hidden=8,
        hidden_flag="--channels",
        hidden_help="width C: conv-ff has C and 2C channels and two dense blocks of "
        "8C units; conv-deq has a C-channel state and 2C channels inside its cell "
        "(the paper's CIFAR-10 networks are wider; 32 is closer)",
        recurrent=False,
    )
    table2.add_argument(
        "--jacobian-penalty",
        type=_non_negative_float,
        default=20.0,
        help=(
            "gamma of the conv DEQ's Jacobian regularisation (Bai et al. 2021), "
            "the same for every method; it keeps the cell contracting as it trains "
            "(without it the drop-in's solve failed on digits); 0 to switch off"
        ),
    )

    meta = rsub.add_parser(
        "meta",
        help="few-shot sinusoid regression: LCP vs iMAML, FOMAML, Reptile",
        description=(
            "Meta-learning with complex synapses on 10-shot sinusoid regression: "
            "the inner learner solves argmin L_learn(phi) + lam/2 |phi - omega|^2; "
            "the slow weights omega are meta-trained with LCP (delta omega = lam u*), "
            "iMAML, or FOMAML and Reptile on that same inner solution (fomaml-prox, "
            "reptile-prox). FOMAML and Reptile proper (fomaml, reptile) adapt by "
            "--inner-steps steps of gradient descent instead. Reports "
            "post-adaptation test MSE."
        ),
    )
    _add_runs_args(meta, _META_METHODS)
    meta.add_argument(
        "--meta-steps", type=_positive_int, default=2000, help="meta-training steps"
    )
    meta.add_argument(
        "--meta-batch", type=_positive_int, default=5, help="tasks per meta-step"
    )
    meta.add_argument("--width", type=_positive_int, default=10, help="MLP width")
    meta.add_argument("--lam", type=_positive_float, default=0.3, help="synapse λ")
    meta.add_argument(
        "--alpha", type=_positive_float, default=1.0, help="LCP controller leak"
    )
    meta.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-3,
        help="Adam step size of the meta-parameters (the slow weights omega)",
    )
    meta.add_argument(
        "--inner-steps",
        type=_positive_int,
        default=1000,
        help="gradient-descent steps of FOMAML's and Reptile's inner loop",
    )
    meta.add_argument(
        "--inner-lr",
        type=_positive_float,
        default=0.003,
        help="step size of FOMAML's and Reptile's inner loop",
    )
    meta.add_argument(
        "--test-tasks",
        type=_positive_int,
        default=100,
        help="held-out tasks for the post-adaptation test MSE",
    )
    _add_output_args(meta)
    return parser


def _progress(args, desc: str):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, file=sys.stderr)


def _mean_std(values):
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std())


def _initial_model(dataset, arch, hidden, seed, feedback):
    """The network a `table1`/`demo` run starts from, and its training key: a run is
    fixed by `seed` (what `docs/results/diagnose_feedback.py` relies on)."""
    import jax
    import jax.numpy as jnp

    from lcp_solvers.experiments import EquilibriumNetwork, Feedforward

    key_model, key_train = jax.random.split(jax.random.key(seed))
    in_size, classes = dataset.x_train.shape[1], dataset.num_classes
    if arch == "ff":
        # The paper's 2-layer net, computed layer by layer.
        model = Feedforward(
            in_size,
            classes,
            (hidden, hidden),
            key=key_model,
            feedback=feedback,
            dtype=jnp.float32,
        )
    else:
        model = EquilibriumNetwork(
            in_size,
            classes,
            hidden,
            key=key_model,
            feedback=feedback,
            dtype=jnp.float32,
        )
    return model, key_train


def _initial_conv_model(
    dataset, arch, channels, seed, feedback=False, jacobian_penalty=0.0
):
    """The convolutional network a `table2` run starts from, and its training key."""
    import math

    import jax
    import jax.numpy as jnp

    from lcp_solvers.experiments import ConvDEQ, ConvFeedforward

    in_shape = dataset.x_train.shape[1:]
    key_model, key_train = jax.random.split(jax.random.key(seed))
    if arch == "conv-ff":
        model = ConvFeedforward(
            in_shape,
            dataset.num_classes,
            channels=(channels, 2 * channels),
            dense=(8 * channels, 8 * channels),
            key=key_model,
            feedback=feedback,
            dtype=jnp.float32,
        )
    else:
        model = ConvDEQ(
            in_shape,
            dataset.num_classes,
            channels=channels,
            hidden=2 * channels,
            groups=math.gcd(channels, 8),
            key=key_model,
            jacobian_penalty=jacobian_penalty,
            dtype=jnp.float32,
        )
    return model, key_train


def _schedule_note(args):
    return ", cosine step size" if args.lr_schedule == "cosine" else ""


def _run_one(method, arch, dataset, args, seed):
    from lcp_solvers.experiments import (
        LeastControl,
        LeastControlDropIn,
        RecurrentBackprop,
        train_classifier,
    )

    n, devices = len(dataset.x_train), args.devices
    if n < args.batch_size and n % devices:
        raise _UsageError(
            f"--devices {devices}: the {n} training examples (fewer than "
            f"--batch-size {args.batch_size}) form one batch that does not split "
            f"over {devices} devices; use --max-train with a multiple of {devices}"
        )
    if arch in _TABLE2_ARCHITECTURES:
        model, key_train = _initial_conv_model(
            dataset, arch, args.channels, seed, method == "kp", args.jacobian_penalty
        )
    else:
        model, key_train = _initial_model(
            dataset, arch, args.hidden, seed, method == "kp"
        )
    if method in ("rbp", "bp"):
        rule = RecurrentBackprop()
    elif method == "dropin":
        rule = LeastControlDropIn()
    else:
        rule = LeastControl(variant=method, alpha=args.alpha)
    _, history = train_classifier(
        model,
        rule,
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        key=key_train,
        progress=_progress(args, f"{_METHOD_NAMES[method]} {arch} seed {seed}"),
        max_recurrent_norm=getattr(args, "max_recurrent_norm", None),
        lr_schedule=args.lr_schedule,
        mesh=_mesh(args.devices),
    )
    return history


def _mesh(count: int):
    """A one-axis mesh of the first `count` devices, or `None` for one device."""
    if count == 1:
        return None
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    if len(devices) < count:
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (
                " (XLA_FLAGS in the environment sets the simulated CPU device count: "
                "raise it or unset it)"
            )
        raise _UsageError(
            f"--devices {count}: only {len(devices)} {jax.default_backend()} "
            f"device(s) are visible{hint}"
        )
    return Mesh(np.array(devices[:count]), ("data",))


def _simulate_cpu_devices(count: int) -> None:
    # On a machine without accelerators XLA shows one CPU device unless told to
    # split the host; the flag must be set before JAX starts and does not affect
    # GPUs/TPUs, which are used when present.
    if count > 1 and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={count}"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


class _UsageError(Exception):
    """A problem with the command line found once JAX is up (exit status 2)."""


def _summarise(histories):
    """Mean/std over seeds of final test accuracy, plus per-epoch averages."""
    import numpy as np

    acc = [100 * h["test_accuracy"][-1] for h in histories]
    # The first epoch includes JIT compilation; leave it out of the timing (with
    # one epoch there is no timing to report).
    sec = [np.mean(h["seconds"][1:]) for h in histories if len(h["seconds"]) > 1]
    out = {
        "test_accuracy": _mean_std(acc)[0],
        "test_accuracy_std": _mean_std(acc)[1],
        "test_accuracy_per_seed": acc,
        "final_H": float(np.mean([h["H"][-1] for h in histories])),
        "seconds_per_epoch": float(np.mean(sec)) if sec else None,
        "mean_solve_steps": float(np.mean([np.mean(h["steps"]) for h in histories])),
        "solve_success": float(
            np.mean([np.mean(h["solve_success"]) for h in histories])
        ),
        "curves": [h["test_accuracy"] for h in histories],
    }
    return out


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt(x, spec):
    import math

    return (
        "n/a"
        if x is None or (isinstance(x, float) and math.isnan(x))
        else format(x, spec)
    )


def _print_table(rows, title):
    header = (
        "| method | arch | test acc. (%) | final H | s / epoch | solve steps |"
        "\n|---|---|---|---|---|---|"
    )
    lines = [title, "", header]
    several_seeds = False
    failures = []
    for (name, arch), r in rows.items():
        if "error" in r:
            failures.append(
                f"{name} ({arch}) failed at seed {r['failed_seed']}: {r['error']}"
            )
            lines.append(f"| {name} | {arch} | failed | | | |")
            continue
        acc = f"{r['test_accuracy']:.2f}"
        if len(r["test_accuracy_per_seed"]) > 1:
            acc += f" ± {r['test_accuracy_std']:.2f}"
            several_seeds = True
        lines.append(
            f"| {name} | {arch} | {acc} | {_fmt(r['final_H'], '.3g')} | "
            f"{_fmt(r['seconds_per_epoch'], '.2f')} | {r['mean_solve_steps']:.1f} |"
        )
    spread = " (mean ± std over seeds)" if several_seeds else ""
    lines += [
        "",
        f"test acc.: at the free equilibrium after the last epoch{spread}. final H: "
        "½‖ψ‖² per example in the last epoch (LCP only). s / epoch: after the "
        "first, which compiles. solve steps: mean steps of the controlled solve "
        "(BP/RBP: of the forward solve).",
        *failures,
    ]
    print("\n".join(lines), flush=True)


def _plot_curves(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, arch), r in rows.items():
        if "error" in r:
            continue
        curves = 100 * np.asarray(r["curves"])
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        (line,) = ax.plot(epochs, mean, label=f"{name} ({arch})")
        if curves.shape[0] > 1:
            std = curves.std(axis=0)
            ax.fill_between(
                epochs, mean - std, mean + std, alpha=0.2, color=line.get_color()
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    # Wrapped: a run's full description is wider than the axes.
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    # Two columns keep a full table's ten curves visible under the legend.
    ax.legend(loc="lower right", fontsize=8, ncol=2 if len(rows) > 6 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}", flush=True)


def _write_json(results, path):
    pathlib.Path(path).write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"wrote {path}", flush=True)


class _Interrupted(Exception):
    # Ctrl-C during a run: carries the rows of the runs that finished.
    def __init__(self, rows):
        super().__init__()
        self.rows = rows


def _classification(args, dataset, methods, architectures, seeds, title):
    rows = {}
    # The drop-in replaces a solve's backward pass; a layered network has none, so
    # on conv-ff it would be backprop again. The paper runs KP on conv-ff only.
    runs = [
        (arch, method)
        for arch in architectures
        for method in methods
        if (arch, method) not in (("conv-ff", "dropin"), ("conv-deq", "kp"))
    ]
    try:
        for i, (arch, method) in enumerate(runs):
            histories = []
            for seed in range(seeds):
                _overall(args, i * seeds + seed, len(runs) * seeds)
                try:
                    histories.append(_run_one(method, arch, dataset, args, seed))
                except (KeyboardInterrupt, _UsageError):
                    raise
                except Exception as e:
                    # A run that raises (e.g. a solve that fails with throw=True)
                    # ends its method's row, not the table.
                    message = _first_line(e)
                    rows[(_METHOD_NAMES[method], arch)] = {
                        "error": f"{type(e).__name__}: {message}",
                        "failed_seed": seed,
                    }
                    print(
                        f"{_METHOD_NAMES[method]} {arch} seed {seed} failed: "
                        f"{type(e).__name__}: {message}",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
            else:
                rows[(_METHOD_NAMES[method], arch)] = _summarise(histories)
    except KeyboardInterrupt:
        raise _Interrupted(rows) from None
    _print_table(rows, title)
    if args.plot:
        _plot_curves(rows, args.plot, title)
    return rows


def _first_line(error: Exception) -> str:
    # An error under jit (equinox's `error_if`) prints the stack first and its
    # message after the last "EquinoxRuntimeError: ".
    text = str(error)
    marker = "EquinoxRuntimeError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _overall(args, done, total):
    # One line per run on stderr (the progress bars show the epochs within a run):
    # runs done and, from their average, the time left.
    import time

    if args.no_progress:
        return
    now = time.monotonic()
    start = getattr(args, "_start", None)
    if start is None:
        start = args._start = now
    left = ""
    if done:
        seconds = (now - start) / done * (total - done)
        left = f", about {seconds / 60:.0f} min left" if seconds >= 60 else ""
        left = left or f", about {seconds:.0f} s left"
    print(f"[run {done + 1} of {total}{left}]", file=sys.stderr, flush=True)


def _demo(args):
    from lcp_solvers.experiments import load_digits

    dataset = load_digits(
        seed=args.seed, max_train=args.max_train, max_test=args.max_test
    )
    title = (
        f"digits ({len(dataset.x_train)} train / {len(dataset.x_test)} test), "
        f"eqRNN {args.hidden} units, {_plural(args.epochs, 'epoch')}, "
        f"alpha {args.alpha:g}" + _schedule_note(args)
    )
    rows = {}
    try:
        for i, method in enumerate(("rbp", "di")):
            _overall(args, i, 2)
            history = _run_one(method, "rnn", dataset, args, args.seed)
            rows[(_METHOD_NAMES[method], "rnn")] = _summarise([history])
    except KeyboardInterrupt:
        raise _Interrupted(rows) from None
    _print_table(rows, title)
    if args.plot:
        _plot_curves(rows, args.plot, title)
    if args.json:
        _write_json({name: _jsonable(r) for (name, _), r in rows.items()}, args.json)
    return 0


def _jsonable(r):
    import math

    # JSON has no NaN: methods without a controlled solve report `null`.
    return {
        k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
    }


def _table1(args):
    from lcp_solvers.experiments import load_dataset

    if args.dataset != "mnist" and args.data_dir is not None:
        print(
            f"note: --data-dir is only used with --dataset mnist; ignoring it for "
            f"{args.dataset}.",
            file=sys.stderr,
        )
    try:
        dataset = load_dataset(
            args.dataset,
            data_dir=args.data_dir,
            max_train=args.max_train,
            max_test=args.max_test,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"lcp-solvers reproduce table1: error: {e}", file=sys.stderr)
        return 2
    title = (
        f"{args.dataset} ({len(dataset.x_train)} train / {len(dataset.x_test)} test), "
        f"hidden {args.hidden}, {_plural(args.epochs, 'epoch')}, "
        f"{_plural(args.seeds, 'seed')}, "
        f"alpha {args.alpha:g}" + _schedule_note(args)
    )
    return _table(args, dataset, title)


def _table2(args):
    from lcp_solvers.experiments import load_dataset, load_digits

    if args.dataset != "cifar10" and args.data_dir is not None:
        print(
            "note: --data-dir is only used with --dataset cifar10; ignoring it.",
            file=sys.stderr,
        )
    try:
        if args.dataset == "digits":
            dataset = load_digits(
                max_train=args.max_train, max_test=args.max_test, as_images=True
            )
        else:
            dataset = load_dataset(
                "cifar10",
                data_dir=args.data_dir,
                max_train=args.max_train,
                max_test=args.max_test,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"lcp-solvers reproduce table2: error: {e}", file=sys.stderr)
        return 2
    c, height, width = dataset.x_train.shape[1:]
    title = (
        f"{args.dataset} ({len(dataset.x_train)} train / {len(dataset.x_test)} test, "
        f"{c}x{height}x{width}), width {args.channels}, "
        f"{_plural(args.epochs, 'epoch')}, {_plural(args.seeds, 'seed')}, "
        f"alpha {args.alpha:g}" + _schedule_note(args)
    )
    return _table(args, dataset, title)


def _table(args, dataset, title):
    # A table's runs, printed and plotted, and written as JSON with keys
    # "<method> [<arch>]" (also the finished ones after Ctrl-C).
    try:
        rows = _classification(
            args, dataset, args.methods, args.architectures, args.seeds, title
        )
    except _Interrupted as e:
        rows = e.rows
        if rows:
            _print_table(rows, title + " (interrupted: finished methods only)")
        if args.json and rows:
            _write_rows_json(rows, args.json)
        raise
    if args.json:
        _write_rows_json(rows, args.json)
    # The table is complete, but a row failed: say so in the exit status.
    return 1 if any("error" in r for r in rows.values()) else 0


def _write_rows_json(rows, path):
    _write_json(
        {f"{name} [{arch}]": _jsonable(r) for (name, arch), r in rows.items()}, path
    )


def _meta(args):
    import jax

    # The inner problems are solved to tight tolerances (their gradients are what is
    # compared), which float32 cannot resolve.
    jax.config.update("jax_enable_x64", True)
    results = {}
    try:
        _meta_runs(args, results)
    except KeyboardInterrupt:
        if args.json and results:
            _write_json(results, args.json)
        raise _Interrupted(results) from None
    _meta_report(args, results)
    return 0


def _meta_runs(args, results):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lcp_solvers.experiments import meta_train
    from lcp_solvers.experiments._meta import META_METHOD_NAMES

    for i, method in enumerate(args.methods):
        _overall(args, i, len(args.methods))
        runs = [
            meta_train(
                method,
                key=jax.random.key(seed),
                meta_steps=args.meta_steps,
                meta_batch=args.meta_batch,
                lam=args.lam,
                alpha=args.alpha,
                width=args.width,
                learning_rate=args.lr,
                inner_steps=args.inner_steps,
                inner_lr=args.inner_lr,
                test_tasks=args.test_tasks,
                progress=_progress(args, f"{META_METHOD_NAMES[method]} seed {seed}"),
                dtype=jnp.float64,
            )
            for seed in range(args.seeds)
        ]
        mse = [r["test_mse"] for r in runs]
        results[META_METHOD_NAMES[method]] = {
            "test_mse": float(np.mean(mse)),
            "test_mse_std": float(np.std(mse)),
            "test_mse_per_seed": mse,
            "seconds_per_step": float(
                np.mean([r["seconds"] / args.meta_steps for r in runs])
            ),
            "curves": [r["curve"] for r in runs],
            "solve_success": float(np.mean([r["solve_success"] for r in runs])),
            "solve_steps": float(np.mean([r["solve_steps"] for r in runs])),
            "inner_success": float(np.mean([r["inner_success"] for r in runs])),
            "test_inner_success": float(
                np.mean([r["test_inner_success"] for r in runs])
            ),
        }


def _meta_report(args, results):
    import numpy as np

    from lcp_solvers.experiments._meta import GD_METHODS, META_METHOD_NAMES

    inner = ""
    if set(args.methods) & set(GD_METHODS):
        inner = f", inner loop {args.inner_steps} x {args.inner_lr}"
    lines = [
        f"10-shot sinusoid regression, MLP width {args.width}, lambda {args.lam}"
        f"{inner}, {args.meta_steps} meta-steps x {args.meta_batch} tasks, "
        f"{args.seeds} seed(s)",
        "",
        "| method | post-adaptation test MSE | s / meta-step | solves converged "
        "| solve steps |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        solves = "— | —"
        if name == META_METHOD_NAMES["lcp"]:
            solves = f"{100 * r['solve_success']:.1f}% | {r['solve_steps']:.1f}"
        lines.append(
            f"| {name} | {r['test_mse']:.3f} ± {r['test_mse_std']:.3f} | "
            f"{r['seconds_per_step']:.3f} | {solves} |"
        )
    n_train = args.meta_steps * args.meta_batch * args.seeds
    n_test = args.test_tasks * args.seeds
    for name, r in results.items():
        # Fractions of 1 in 30,000 print as 100.00%; say how many.
        failed = round((1 - r["inner_success"]) * n_train)
        failed_test = round((1 - r["test_inner_success"]) * n_test)
        if failed or failed_test:
            lines.append(
                f"\nWarning: {name}: {failed:,} of {n_train:,} training and "
                f"{failed_test} of {n_test} test inner BFGS solves did not converge "
                "within max_steps; they count where BFGS stopped."
            )
    print("\n".join(lines), flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            curve = np.mean(np.asarray(r["curves"]), axis=0)
            # A running mean: single meta-batches are noisy.
            k = max(len(curve) // 20, 1)
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth, label=name)
        ax.set_xlabel("meta-step")
        ax.set_ylabel("post-adaptation query MSE (meta-batch)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"saved {args.plot}", flush=True)
    if args.json:
        _write_json(results, args.json)


def _missing_extras() -> list[str]:
    import importlib.util

    modules = {
        "optax": "optax",
        "sklearn": "scikit-learn",
        "matplotlib": "matplotlib",
        "tqdm": "tqdm",
        "mnist1d": "mnist1d",
    }
    return [
        package
        for module, package in modules.items()
        if importlib.util.find_spec(module) is None
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lcp-solvers` console script.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status (0 on success).
    """
    args, unknown = _build_parser().parse_known_args(argv)
    if unknown:
        # argparse reports these from the top-level parser; name the subcommand
        # whose help lists what is accepted.
        prog = _prog(args)
        print(
            f"{prog}: error: unrecognized arguments: {' '.join(unknown)}\n"
            f"Run `{prog} --help`.",
            file=sys.stderr,
        )
        return 2
    missing = _missing_extras()
    if missing:
        print(
            "lcp-solvers: the experiments need the `examples` extra (missing: "
            f"{', '.join(missing)}). Install it with: "
            "pip install 'lcp-solvers[examples]' (from a clone: pip install "
            "'.[examples]').",
            file=sys.stderr,
        )
        return 2
    problem = _check_paths(args) or _check_devices(args)
    if problem:
        print(f"{_prog(args)}: error: {problem}", file=sys.stderr)
        return 2
    _simulate_cpu_devices(getattr(args, "devices", 1))
    try:
        if args.command == "demo":
            return _demo(args)
        if args.experiment == "table1":
            return _table1(args)
        if args.experiment == "table2":
            return _table2(args)
        return _meta(args)
    except _UsageError as e:
        print(f"{_prog(args)}: error: {e}", file=sys.stderr)
        return 2
    except _Interrupted as e:
        kept = f"; kept the {len(e.rows)} finished" if e.rows else ""
        print(f"\nlcp-solvers: interrupted{kept}", file=sys.stderr)
        return 130


def _prog(args) -> str:
    # The command as typed, e.g. "lcp-solvers reproduce table1", for messages.
    words = (args.command, getattr(args, "experiment", None))
    return " ".join(["lcp-solvers", *(w for w in words if w)])


def _check_devices(args) -> str | None:
    devices = getattr(args, "devices", 1)
    if devices > 1 and args.batch_size % devices:
        return (
            f"--batch-size {args.batch_size} does not split over --devices {devices}; "
            f"use a multiple of {devices}"
        )
    return None


def _check_paths(args) -> str | None:
    """Why an output path or `--data-dir` cannot be used, checked before any work
    (a bad path would otherwise fail only after training)."""
    for option in ("json", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        target = pathlib.Path(path)
        if path == _DEMO_PLOT:
            target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            return f"--{option} {path}: is a directory; give a file name"
        if not target.parent.is_dir():
            return f"--{option} {path}: the directory {target.parent} does not exist"
        existed = target.exists()
        try:
            with open(target, "a"):
                pass
        except OSError as e:
            return f"--{option} {path}: cannot write there ({e.strerror})"
        if not existed:
            target.unlink()
    needs = {
        "mnist": "a directory with mnist.npz or the four MNIST IDX files",
        "cifar10": "a directory with CIFAR-10's python batches (data_batch_1..5, "
        "test_batch)",
    }
    dataset = getattr(args, "dataset", None)
    if dataset in needs:
        data_dir = args.data_dir
        if data_dir is None:
            return (
                f"--dataset {dataset} needs --data-dir DIR, {needs[dataset]} "
                "(nothing is downloaded)"
            )
        if not pathlib.Path(data_dir).is_dir():
            return f"--data-dir {data_dir}: not a directory"
    return None


if __name__ == "__main__":
    sys.exit(main())
