"""``fused-sam demo``: SAM's robustness to label noise, on data that needs no download.

The SAM paper (Foret et al. 2021, section 3.3) reports that SAM is markedly more robust to noisy
training labels than plain SGD: SGD ends up memorising the wrong labels, SAM much less so. This
module reproduces that finding at laptop scale on scikit-learn's handwritten digits: a fraction of
the *training* labels (default 40%) is replaced by a wrong class, the test labels stay clean, and
a small CNN with BatchNorm is trained with the same epochs, batch size and learning-rate schedule
by every method of :data:`METHODS`, over several seeds.

Hyperparameters are fixed, documented defaults (:class:`DemoConfig`). SAM's rho (0.5) comes
from the SAM paper's grid {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}, ASAM's (2.0) from the range its
authors use (0.5 to 2.0); both were chosen with ``--validation``, which evaluates on a split
carved from the noisy *training* data, never on the test split.

The library parts (:func:`run_demo`, :func:`summarise`) return plain dicts; the optional
dependencies (rich for the progress bar and table, matplotlib for the plot) are imported only
where they are used.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fused_sam.bn import frozen_bn_stats
from fused_sam.cli.data import Dataset, add_symmetric_noise, load_dataset
from fused_sam.cli.models import make_model
from fused_sam.functional import resolve_backend
from fused_sam.masks import FisherMask, RandomMask
from fused_sam.optimizer import FusedSAM
from fused_sam.variants import GSAM, EveryK, FriendlySAM, LookSAM, MomentumSAM

__all__ = ["METHODS", "DemoConfig", "Method", "run_demo", "summarise", "write_outputs"]

_DEMO_EXTRA = 'pip install "fused_sam[demo]"'


def require(module: str) -> Any:
    """Import an optional dependency of the demo, or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"fused-sam demo needs {module.split('.')[0]}: {_DEMO_EXTRA}") from exc


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DemoConfig:
    """Everything that defines a demo run (stored verbatim in ``results.json``).

    Attributes:
        data: data set name (``digits``, ``cifar10``, ``cifar100``).
        data_dir: folder of the CIFAR python batches (unused for digits).
        noise: fraction of training labels replaced by a wrong class.
        methods: method names from :data:`METHODS`, in table order.
        seeds: seeds; each seed fixes the label noise, the initialisation and the batch order,
            and is shared by every method so that comparisons are paired.
        epochs: training epochs (the same for every method).
        batch_size: mini-batch size.
        lr: peak learning rate of SGD with momentum (cosine decay to 0 over all steps).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        width: channels of the first conv layer of the CNN (doubled in the second block).
        rho_sam: SAM's rho.
        rho_asam: ASAM's rho (official ASAM: ``adaptive="weights"``, ``eta=0.01``).
        rho_msam: Momentum-SAM's rho (a radius along the momentum direction; the paper uses
            3.0 on CIFAR against SAM's 0.2 there).
        keep_esam: ESAM's probability of perturbing an entry (its beta).
        eta_asam: ASAM's eta.
        subset: use only the first ``subset`` training examples (``None``: all); for tests.
        validation: evaluate on 20% of the (noisy) training split instead of the test split;
            the way to choose hyperparameters without looking at the test labels.
        device: torch device string.
        backend: ``FusedSAM`` backend (``None``: the fastest available).
    """

    data: str = "digits"
    data_dir: str | None = None
    noise: float = 0.4
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    rho_sam: float = 0.5
    rho_asam: float = 2.0
    rho_msam: float = 3.0
    keep_esam: float = 0.5
    eta_asam: float = 0.01
    ssam_sparsity: float = 0.5
    ssam_samples: int = 16
    ssam_update_epochs: int = 5
    subset: int | None = None
    validation: bool = False
    device: str = "cpu"
    backend: str | None = None


#: ``--quick``: the same methods on a shorter schedule and two seeds, in well under 2 minutes.
QUICK_OVERRIDES: dict[str, Any] = {"epochs": 15, "seeds": [0, 1]}


# ---------------------------------------------------------------------------------------------
# Methods: a registry of named optimizer factories


@dataclass(frozen=True)
class Method:
    """One training method of the demo.

    Attributes:
        label: name shown in the table and plot.
        build: ``build(params, config) -> optimizer``. A :class:`FusedSAM` result is trained
            with two passes per step (``first_step`` / ``second_step``, BatchNorm statistics
            from the first pass only); any other optimizer with one pass.
        rho: ``rho(config)``, the radius shown in the table (``None`` for non-SAM methods).
    """

    label: str
    build: Callable[[nn.Module, DemoConfig, TrainSet], torch.optim.Optimizer]
    rho: Callable[[DemoConfig], float] | None = None


@dataclass(frozen=True)
class TrainSet:
    """The (noisy) training tensors of one run, for methods that score on examples (SSAM-F)."""

    x: Tensor
    y: Tensor
    seed: int

    def shuffled_batches(self, size: int) -> Iterable[tuple[Tensor, Tensor]]:
        """An iterable of ``(x, y)`` batches in a fresh random order at every iteration."""
        return _Shuffled(self, size)


class _Shuffled:
    def __init__(self, data: TrainSet, size: int) -> None:
        self.data, self.size = data, size
        self.gen = torch.Generator().manual_seed(20_000 + data.seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(self.data.x.shape[0], generator=self.gen).to(self.data.x.device)
        for i in range(0, perm.numel(), self.size):
            idx = perm[i : i + self.size]
            yield self.data.x[idx], self.data.y[idx]


def _sgd_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}


def _variant(model: nn.Module, cfg: DemoConfig, **variant: Any) -> FusedSAM:
    """SAM with SAM's rho and a variant (``schedule=`` or ``direction=``)."""
    return FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=cfg.rho_sam,
        backend=cfg.backend,
        **variant,
        **_sgd_kwargs(cfg),
    )


def _ssamf(model: nn.Module, cfg: DemoConfig, train: TrainSet) -> FusedSAM:
    # Official SSAM-F recipe: Fisher from 16 single examples, mask refreshed every 5 epochs.
    steps_per_epoch = max(1, train.x.shape[0] // cfg.batch_size)
    policy = FisherMask(
        train.shuffled_batches(cfg.ssam_samples), model, num_samples=cfg.ssam_samples
    )
    return FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=cfg.rho_sam,
        sparsity=cfg.ssam_sparsity,
        mask=policy,
        mask_update_every=cfg.ssam_update_epochs * steps_per_epoch,
        backend=cfg.backend,
        **_sgd_kwargs(cfg),
    )


#: Every method the demo knows, by the name used on the command line.
METHODS: dict[str, Method] = {
    "sgd": Method(
        "SGD", lambda model, cfg, _: torch.optim.SGD(model.parameters(), **_sgd_kwargs(cfg))
    ),
    "sam": Method(
        "SAM",
        lambda model, cfg, _: FusedSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=cfg.rho_sam,
            backend=cfg.backend,
            **_sgd_kwargs(cfg),
        ),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "asam": Method(
        "ASAM",
        lambda model, cfg, _: FusedSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=cfg.rho_asam,
            adaptive="weights",
            eta=cfg.eta_asam,
            backend=cfg.backend,
            **_sgd_kwargs(cfg),
        ),
        rho=lambda cfg: cfg.rho_asam,
    ),
    "ssamf": Method("SSAM-F", _ssamf, rho=lambda cfg: cfg.rho_sam),
    "sam5": Method(
        "SAM every 5",
        lambda model, cfg, _: _variant(model, cfg, schedule=EveryK(5)),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "looksam": Method(
        "LookSAM",
        lambda model, cfg, _: _variant(model, cfg, schedule=LookSAM(k=5, alpha=0.2)),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "fsam": Method(
        "F-SAM",
        lambda model, cfg, _: _variant(model, cfg, direction=FriendlySAM(sigma=1.0, lam=0.9)),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "gsam": Method(
        "GSAM",
        lambda model, cfg, _: _variant(model, cfg, direction=GSAM(alpha=0.4)),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "esam": Method(
        "ESAM (random half)",
        lambda model, cfg, train: _variant(
            model, cfg, mask=RandomMask(keep=cfg.keep_esam, seed=train.seed)
        ),
        rho=lambda cfg: cfg.rho_sam,
    ),
    "msam": Method(
        "Momentum-SAM",
        lambda model, cfg, _: MomentumSAM(
            model.parameters(), torch.optim.SGD, rho=cfg.rho_msam, **_sgd_kwargs(cfg)
        ),
        rho=lambda cfg: cfg.rho_msam,
    ),
}

#: Methods run when ``--methods`` is not given: all of them.
#: What ``fused-sam demo`` runs without ``--methods``; the variants (sam5, looksam, fsam, gsam,
#: esam, msam) run on request.
DEFAULT_METHODS: tuple[str, ...] = ("sgd", "sam", "asam", "ssamf")


# ---------------------------------------------------------------------------------------------
# Training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent, with the model in eval mode (BatchNorm running stats)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


def _split(
    data: Dataset, cfg: DemoConfig, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Noisy training tensors and the evaluation tensors of one seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x_train, y_train = data.x_train, data.y_train
    if cfg.subset is not None:
        x_train, y_train = x_train[: cfg.subset], y_train[: cfg.subset]
    y_noisy, corrupted = add_symmetric_noise(y_train, cfg.noise, data.num_classes, gen)
    if not cfg.validation:
        return x_train, y_noisy, corrupted, data.x_test, data.y_test
    # Hold out 20% of the noisy training split: the labels a practitioner would have.
    perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(99))
    n_val = x_train.shape[0] // 5
    val, train = perm[:n_val], perm[n_val:]
    return x_train[train], y_noisy[train], corrupted[train], x_train[val], y_noisy[val]


class Run:
    """Training state of one ``(method, seed)`` pair, advanced one epoch at a time.

    :func:`run_demo` interleaves the methods epoch by epoch, so that load from other programs
    on the machine disturbs every method's step times alike instead of whichever ran then.

    Args:
        method: key of :data:`METHODS`.
        seed: seed of the label noise, the initialisation and the batch order.
        data: the data set.
        cfg: the run configuration.
    """

    def __init__(self, method: str, seed: int, data: Dataset, cfg: DemoConfig) -> None:
        self.method, self.seed, self.cfg = method, seed, cfg
        self.device = torch.device(cfg.device)
        x_train, y_train, corrupted, x_eval, y_eval = _split(data, cfg, seed)
        move = [t.to(self.device) for t in (x_train, y_train, corrupted, x_eval, y_eval)]
        self.x_train, self.y_train, self.corrupted, self.x_eval, self.y_eval = move
        torch.manual_seed(seed)
        self.model = make_model(data.x_train.shape[1], data.num_classes, cfg.width).to(self.device)
        train = TrainSet(self.x_train, self.y_train, seed)
        self.opt = METHODS[method].build(self.model, cfg, train)
        self.two_pass = isinstance(self.opt, FusedSAM)
        self.steps_per_epoch = max(1, x_train.shape[0] // cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=cfg.epochs * self.steps_per_epoch
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.order = torch.Generator().manual_seed(seed)
        self.history: dict[str, list[float]] = {
            "eval_acc": [],
            "train_loss": [],
            "step_times": [],
            "elapsed": [],
        }

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.two_pass and self.opt.next_step == "sam":  # a schedule may make it plain
            self.opt.first_step(zero_grad=True)
            with frozen_bn_stats(self.model):  # BN statistics from the first pass only
                self.loss_fn(self.model(x), y).backward()
            self.opt.second_step(zero_grad=True)
        else:
            self.opt.step()
            self.opt.zero_grad()
        self.sched.step()
        return loss.detach()

    def _evaluated_weights(self) -> contextlib.AbstractContextManager[Any]:
        """Evaluate at ``w``: a one-pass Momentum-SAM keeps the weights perturbed between
        steps and restores them inside its ``unperturbed()`` context."""
        unperturbed = getattr(self.opt, "unperturbed", None)
        return unperturbed() if unperturbed is not None else contextlib.nullcontext()

    def epoch(self) -> float:
        """Train one epoch, evaluate, record; returns the evaluation accuracy (percent)."""
        n, bs = self.x_train.shape[0], self.cfg.batch_size
        perm = torch.randperm(n, generator=self.order).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        self.model.train()
        _sync(self.device)
        start = time.perf_counter()
        for i in range(self.steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            loss_sum += self._step(self.x_train[idx], self.y_train[idx])
        _sync(self.device)
        seconds = time.perf_counter() - start
        with self._evaluated_weights():
            acc = accuracy(self.model, self.x_eval, self.y_eval)
        h = self.history
        h["eval_acc"].append(acc)
        h["train_loss"].append(float(loss_sum) / self.steps_per_epoch)
        h["step_times"].append(seconds / self.steps_per_epoch)
        h["elapsed"].append((h["elapsed"][-1] if h["elapsed"] else 0.0) + seconds)
        return acc

    def result(self) -> dict[str, Any]:
        """The run's history, plus ``final_acc`` and ``noisy_fit``.

        ``noisy_fit`` is the percent of corrupted training examples the final model predicts
        with their *wrong* training label: how much of the noise it memorised.
        """
        wrong = self.corrupted
        with self._evaluated_weights():
            fit = (
                accuracy(self.model, self.x_train[wrong], self.y_train[wrong])
                if wrong.any()
                else None
            )
        return {
            "method": self.method,
            "seed": self.seed,
            **self.history,
            "final_acc": self.history["eval_acc"][-1],
            "noisy_fit": fit,
        }


def validate_config(cfg: DemoConfig) -> None:
    """Raise ``ValueError`` with a readable message for any invalid setting."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not cfg.methods:
        raise ValueError("no methods given")
    if not cfg.seeds:
        raise ValueError("no seeds given")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch size must be >= 2 (BatchNorm), got {cfg.batch_size}")
    if not 0.0 <= cfg.noise < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {cfg.noise}")
    if not 0.0 < cfg.keep_esam <= 1.0:
        raise ValueError(f"ESAM's keep must be in (0, 1], got {cfg.keep_esam}")
    if cfg.subset is not None and cfg.subset < cfg.batch_size:
        raise ValueError(f"subset ({cfg.subset}) must be at least the batch size")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    if cfg.backend is not None:
        # Unknown names raise ValueError, unusable ones BackendUnavailableError with the reason.
        resolve_backend(cfg.backend, device)


def run_demo(
    cfg: DemoConfig,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train every ``(method, seed)`` pair of ``cfg``; returns all numbers.

    Args:
        cfg: the run configuration (validated here).
        progress: called after every epoch of every run with
            ``(method, seed, epoch, eval_accuracy)``.

    Returns:
        ``{"config": ..., "runs": [...], "summary": {...}, "environment": ...}``, JSON-ready.
    """
    validate_config(cfg)
    data = load_dataset(cfg.data, cfg.data_dir)
    runs = []
    for seed in cfg.seeds:
        active = [Run(method, seed, data, cfg) for method in cfg.methods]
        for epoch in range(cfg.epochs):
            for run in active:
                acc = run.epoch()
                if progress is not None:
                    progress(run.method, seed, epoch, acc)
        runs += [run.result() for run in active]
    from fused_sam.cli.info import collect_info

    return {
        "config": asdict(cfg),
        "eval_split": "validation (noisy labels)" if cfg.validation else "test (clean labels)",
        "train_size": int(cfg.subset or data.x_train.shape[0]),
        "test_size": int(data.x_test.shape[0]),
        "runs": runs,
        "summary": summarise(runs, cfg),
        "environment": collect_info(),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(runs: list[dict[str, Any]], cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Per method: final accuracy mean/std over seeds, time per step, ratio to SGD."""
    summary: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        acc_mean, acc_std = _mean_std([r["final_acc"] for r in mine])
        # Median over all epochs and seeds: robust to the first epoch's warm-up and to bursts of
        # load from other programs; the fastest epoch is kept too, as the least disturbed.
        times = [t for r in mine for t in r["step_times"]]
        step = statistics.median(times)
        m = METHODS[method]
        summary[method] = {
            "label": m.label,
            "rho": m.rho(cfg) if m.rho is not None else None,
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "accs": [r["final_acc"] for r in mine],
            "noisy_fit_mean": statistics.fmean(
                r["noisy_fit"] for r in mine if r["noisy_fit"] is not None
            )
            if any(r["noisy_fit"] is not None for r in mine)
            else None,
            "step_ms": 1e3 * step,
            "step_ms_min": 1e3 * min(times),
            "train_s_mean": statistics.fmean(r["elapsed"][-1] for r in mine),
        }
    sgd = summary.get("sgd")
    for entry in summary.values():
        entry["time_ratio"] = entry["step_ms"] / sgd["step_ms"] if sgd else None
    return summary


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, plot


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` of the summary."""
    table_mod = require("rich.table")
    cfg = results["config"]
    split = "val" if cfg["validation"] else "test"
    table = table_mod.Table(
        title=(
            f"{cfg['data']}, {100 * cfg['noise']:.0f}% symmetric label noise, "
            f"{cfg['epochs']} epochs, {len(cfg['seeds'])} seed(s), {cfg['device']}"
        )
    )
    table.add_column("method")
    table.add_column("rho", justify="right")
    table.add_column(f"{split} acc % (mean ± std)", justify="right")
    table.add_column("noisy labels fit %", justify="right")
    table.add_column("ms / step", justify="right")
    table.add_column("time vs SGD", justify="right")
    for entry in results["summary"].values():
        table.add_row(
            entry["label"],
            "-" if entry["rho"] is None else f"{entry['rho']:g}",
            f"{entry['acc_mean']:.2f} ± {entry['acc_std']:.2f}",
            _fmt(entry["noisy_fit_mean"], ".1f"),
            f"{entry['step_ms']:.2f}",
            "-" if entry["time_ratio"] is None else f"{entry['time_ratio']:.2f}x",
        )
    return table


def table_markdown(results: dict[str, Any]) -> str:
    """The summary as a Markdown table (what the README quotes)."""
    split = "val" if results["config"]["validation"] else "test"
    lines = [
        f"| method | rho | {split} acc % (mean ± std) | noisy labels fit % | ms / step "
        "| time vs SGD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in results["summary"].values():
        rho = "-" if e["rho"] is None else f"{e['rho']:g}"
        ratio = "-" if e["time_ratio"] is None else f"{e['time_ratio']:.2f}x"
        lines.append(
            f"| {e['label']} | {rho} | {e['acc_mean']:.2f} ± {e['acc_std']:.2f} | "
            f"{_fmt(e['noisy_fit_mean'], '.1f')} | {e['step_ms']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per epoch (mean ± std band) and accuracy against training time, per method."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    plt = require("matplotlib.pyplot")
    cfg = results["config"]
    split = "validation" if cfg["validation"] else "test"
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for method, entry in results["summary"].items():
        runs = [r for r in results["runs"] if r["method"] == method]
        accs = torch.tensor([r["eval_acc"] for r in runs])
        mean, std = accs.mean(0), accs.std(0) if len(runs) > 1 else torch.zeros(accs.shape[1])
        epochs = range(1, accs.shape[1] + 1)
        (line,) = ax_epoch.plot(epochs, mean, label=entry["label"])
        ax_epoch.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=line.get_color())
        elapsed = torch.tensor([r["elapsed"] for r in runs]).mean(0)
        ax_time.plot(elapsed, mean, label=entry["label"], color=line.get_color())
    ax_epoch.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title="accuracy per epoch")
    ax_time.set(
        xlabel="training time (s, mean over seeds)",
        ylabel=f"{split} accuracy (%)",
        title="accuracy vs time",
    )
    for ax in (ax_epoch, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{cfg['data']}: {100 * cfg['noise']:.0f}% label noise, mean ± std over "
        f"{len(cfg['seeds'])} seed(s)"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(obj: Any) -> Any:
    # JSON has no NaN/inf: write them as null so that strict parsers accept the file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``results.json`` and ``demo.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "plot": out / "demo.png"}
    paths["json"].write_text(json.dumps(_finite(results), indent=1) + "\n")
    plot(results, paths["plot"])
    return paths
