"""Edge sensors: several wearables train a small 1-D CNN on their own accelerometer/gyroscope data.

The BasicMotions data set (six channels of a smart watch, 100 time steps, four activities:
standing, walking, running, badminton) ships inside the ``aeon`` package. Each device holds a
share of the recordings and runs the convolutional bottom; the server holds the classifier.
Devices keep several batches in flight (asynchronous, staleness-corrected) and their bottoms
are averaged after every epoch (SplitFed). Compared with the same CNN trained in one process
on all the recordings for the same epochs.

    python examples/edge_sensors.py [--epochs 40] [--devices 2]
"""
from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import splitmq
from _common import arguments, report, run
from splitmq.workers.launch import PartySpec

DATASET = "BasicMotions"
CLASSES = ("Standing", "Running", "Walking", "Badminton")


def _ts_file(split: str) -> Path:
    """The data file inside the installed aeon wheel (found without importing aeon itself)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or spec.origin is None:
        raise ValueError("this example needs the aeon package for its data: pip install 'splitmq[examples]'")
    return Path(spec.origin).parent / "datasets" / "data" / DATASET / f"{DATASET}_{split}.ts"


def read_ts(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A .ts file of equal-length series: (N, channels, length) float32 and (N,) class indices."""
    series, labels, data = [], [], False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            data = True
            continue
        if data:
            *channels, label = line.split(":")
            series.append([[float(v) for v in c.split(",")] for c in channels])
            labels.append(CLASSES.index(label))
    return torch.tensor(series, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def recordings(client_index: int = 0, num_clients: int = 1) -> splitmq.Data:
    """Device ``client_index``'s share of the training recordings, and every test recording."""
    x, y = read_ts(_ts_file("TRAIN"))                           # (40, 6, 100)
    tx, ty = read_ts(_ts_file("TEST"))
    mean, std = x.mean((0, 2), keepdim=True), x.std((0, 2), keepdim=True)
    x, tx = (x - mean) / std, (tx - mean) / std
    rows = torch.arange(client_index, len(y), num_clients)
    return splitmq.Data(splitmq.SampleSet(x[rows], y[rows], rows),
                        splitmq.SampleSet(tx, ty, torch.arange(len(ty)) + 10_000))


def model() -> nn.Sequential:
    """Two conv blocks on the device, the classifier on the server (cut after ``features``)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv1d(6, 16, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool1d(2)),  # (B, 16, 50)
        ("conv2", nn.Conv1d(16, 16, 5, padding=2)), ("relu2", nn.ReLU()),
        ("pool2", nn.AdaptiveAvgPool1d(8)), ("features", nn.Flatten()),                               # (B, 128)
        ("fc1", nn.Linear(128, 32)), ("relu3", nn.ReLU()), ("out", nn.Linear(32, len(CLASSES))),
    ]))


def job(epochs: int, devices: int, job_id: str = "sensors") -> splitmq.JobConfig:
    return splitmq.job(job_id=job_id, model="edge_sensors:model", cuts=["features"], data="edge_sensors:recordings",
                       loss="cross_entropy", task="classification", optimizer="Adam", lr=0.003, epochs=epochs,
                       batch_size=4, num_clients=devices, max_in_flight=2, bottom_sync="average")


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__.splitlines()[0], epochs=40)
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args(argv)
    cfg = job(args.epochs, args.devices, args.job_id or "sensors")
    parties = [PartySpec("server", "server")]
    parties += [PartySpec(f"device-{i}", "worker", ("--client-index", str(i))) for i in range(args.devices)]
    summaries = run(cfg, parties, args)
    local = splitmq.train_local(cfg.replace(num_clients=1, max_in_flight=1), data=recordings())
    accuracy = [summaries[f"device-{i}"]["test_scores"]["accuracy"] for i in range(args.devices)]
    report(f"edge sensors ({DATASET}, {args.devices} devices, 2 in flight, averaged bottoms)", "accuracy",
           sum(accuracy) / len(accuracy), local.test_scores["accuracy"], {"per device": accuracy}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
