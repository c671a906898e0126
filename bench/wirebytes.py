"""Part 4: bytes on the wire, measured, beside the textbook formulas.

Split learning sends each sample's cut activations up and their gradient down: about
``2 x cut floats x 4 bytes`` per sample, so an epoch costs that times the training set,
whatever the number of clients. Federated averaging sends the whole model down and back
once per client per round: ``2 x parameters x 4 bytes``. Measured numbers are message body
bytes counted by the workers (``bytes_sent``/``bytes_received``, the same counts as
``splitmq_bytes_total``); they include labels and sample ids (8 bytes each per sample) and
the msgpack envelope, not AMQP framing or TCP headers.
"""
from __future__ import annotations

from typing import Any

from splitmq.bench.common import cut_numel, dataset, param_count

FLOAT_BYTES = 4


def textbook(model: str, train_samples: int) -> dict[str, float]:
    """The two formulas for ``model`` over ``train_samples`` per epoch."""
    cut = cut_numel(model)
    params = param_count(model)
    split_per_sample = 2 * cut * FLOAT_BYTES
    return {"cut_floats": cut, "parameters": params, "split_bytes_per_sample": split_per_sample,
            "split_bytes_per_epoch": split_per_sample * train_samples,
            "fedavg_bytes_per_client_per_round": 2 * params * FLOAT_BYTES}


def table(job_rows: list[dict[str, Any]], dataset_name: str) -> dict[str, Any]:
    """For each model: the formulas and the measured bytes of its synchronous one-client run."""
    train_samples = len(dataset(dataset_name).train)
    out: dict[str, Any] = {"train_samples_per_epoch": train_samples, "dataset": dataset_name, "models": {}}
    for row in job_rows:
        if row["clients"] != 1 or row["in_flight"] != 1 or row["delay_s"] or row["model"] in out["models"]:
            continue
        book = textbook(row["model"], train_samples)
        measured = row["worker_bytes_per_sample"]
        out["models"][row["model"]] = {
            **book, "measured_bytes_per_sample": measured,
            "measured_bytes_per_epoch": measured * train_samples,
            "measured_over_split_formula": measured / book["split_bytes_per_sample"],
            "trainer_bytes_per_sample": (row["trainer_bytes_sent"] + row["trainer_bytes_received"]) / row["samples"],
        }
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    n = result["train_samples_per_epoch"]
    lines = [f"Per epoch = {n:,} training samples (the {result['dataset']} training split). "
             "Federated averaging: one round per epoch.", "",
             "| model | cut floats | parameters | split formula B/sample | measured B/sample | measured / formula "
             "| split formula MB/epoch | measured MB/epoch | FedAvg MB/client/round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['cut_floats']:,} | {r['parameters']:,} | {r['split_bytes_per_sample']:,} "
            f"| {r['measured_bytes_per_sample']:,.0f} | {r['measured_over_split_formula']:.3f} "
            f"| {r['split_bytes_per_epoch'] / 1e6:.2f} | {r['measured_bytes_per_epoch'] / 1e6:.2f} "
            f"| {r['fedavg_bytes_per_client_per_round'] / 1e6:.2f} |")
    return lines
