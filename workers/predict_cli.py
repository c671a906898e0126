"""The ``splitmq predict`` command line: inputs and outputs around ``workers.predict.Predictor``.

Batch: ``--input test|train|FILE.npy|FILE.csv --output FILE.npy|FILE.csv`` (a progress line on
standard error, the summary at the end). Online: ``--online`` reads one request per line of
standard input (a sample id of this owner's data, or a JSON list of feature values) and
writes one JSON answer per line. ``--serve``: only answer the requests this party serves
(its vertical part, exports) until stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from splitmq.shared import defaults


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from splitmq.workers import options
    p = sub.add_parser("predict", help="a data owner's predictions through the split model (batch, online, serve)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_job_options(p)
    options.add_connection_options(p)
    g = p.add_argument_group("predict")
    g.add_argument("--client-id", default="", help="this owner's name (default client-<index>)")
    g.add_argument("--client-index", type=int, default=0, help="which owner of the job this is (0-based)")
    g.add_argument("--run-dir", help="where training kept this owner's segments (default runs/<job>)")
    g.add_argument("--checkpoint-dir", help="take the trained segments from this owner's checkpoint instead")
    g.add_argument("--input", default="test", help="test or train (this owner's data set), or a .npy / .csv file "
                                                     "of features, one sample per row")
    g.add_argument("--output", help="predictions file: .npy (the outputs) or .csv (sample id, prediction, outputs)")
    g.add_argument("--online", action="store_true", help="answer one request per line of standard input")
    g.add_argument("--serve", action="store_true", help="only serve this party's vertical part and export "
                                                        "requests, until stopped")
    g.add_argument("--request-size", type=int, default=256, help="samples per request (batch mode)")
    g.add_argument("--in-flight", type=int, default=4, help="requests outstanding at once (batch mode)")
    g.add_argument("--timeout", type=float, default=defaults.PREDICT_TIMEOUT_S, help="each request's deadline (s)")
    g.add_argument("--summary-json", help="write the run's summary here")
    g.add_argument("--torch-threads", type=int, default=defaults.TORCH_THREADS,
                   help="CPU threads for this owner's segments")
    p.set_defaults(func=main, needs_torch=True)


def main(args: argparse.Namespace) -> int:
    from splitmq.workers import assemble, cli, options, runtime
    from splitmq.workers.predict import PredictOptions, Predictor
    from splitmq.workers.roles.requests import PredictionError

    cfg = options.job_config(args)
    assemble.configure_process(args.torch_threads, "cpu")
    opts = PredictOptions(client_id=args.client_id, client_index=args.client_index, run_dir=args.run_dir,
                          checkpoint_dir=args.checkpoint_dir, timeout_s=args.timeout)
    predictor = Predictor(cfg, opts, amqp_url=args.amqp_url, tls=options.tls_options(args), stop=cli.STOP)
    if args.serve:
        outcome = predictor.party.run()
        runtime.write_json(args.summary_json, outcome.summary)
        return outcome.reason.exit_code
    try:
        predictor.start()
        summary = _online(predictor, cfg, args) if args.online else _batch(predictor, cfg, args)
    except PredictionError as exc:
        print(f"splitmq predict: {exc}", file=sys.stderr)
        predictor.close()
        return 75 if exc.reason in ("timeout", "unavailable") else 1
    outcome = predictor.close()
    runtime.write_json(args.summary_json, {**outcome.summary, **summary})
    return 0


def _inputs(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Features (tensor or SampleSet), sample ids and labels (or None) of ``--input``."""
    import numpy as np
    import torch

    from splitmq.shared.errors import ConfigError
    from splitmq.workers import assemble

    if args.input in ("test", "train"):
        samples = assemble.owner_data(cfg, args.client_index)
        chosen = samples.test if args.input == "test" else samples.train
        if chosen is None:
            raise ConfigError(f"--input {args.input}: this owner's data has no {args.input} split")
        return chosen, chosen.ids, chosen.y
    if cfg.vertical_parts:
        raise ConfigError("a vertical job predicts samples every party holds: --input test or train")
    path = Path(args.input)
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    elif path.suffix == ".csv":
        try:
            x = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        except ValueError:  # a header row
            x = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, skiprows=1)
    else:
        raise ConfigError(f"--input {args.input}: use test, train, a .npy or a .csv file")
    features = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    return features, torch.arange(len(features)), None


def _batch(predictor: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from splitmq.workers.predict import predict_all

    x, ids, labels = _inputs(cfg, args)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - started)
        print(f"\rpredict: {done}/{total} samples ({100 * done // max(1, total)}%), {rate:,.0f}/s",
              end="", file=sys.stderr, flush=True)

    outputs = predict_all(predictor, x, ids, batch_size=args.request_size, in_flight=args.in_flight, progress=progress)
    seconds = time.perf_counter() - started
    print(file=sys.stderr)
    summary: dict[str, Any] = {"samples": len(outputs), "seconds": seconds,
                               "samples_per_second": len(outputs) / max(1e-9, seconds)}
    if labels is not None and cfg.task.value == "classification":
        summary["accuracy"] = float((outputs.argmax(1) == labels).float().mean())
    if args.output:
        write_predictions(Path(args.output), outputs, ids, cfg.task.value)
    print(f"predict: {len(outputs)} predictions in {seconds:.1f}s"
          + (f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else "")
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return summary


def decided(outputs: Any, task: str) -> Any:
    """The prediction each output row stands for: a class, a 0/1, or a value."""
    if task == "classification":
        return outputs.argmax(1)
    if task == "binary":
        return (outputs.reshape(len(outputs), -1)[:, 0] > 0).long()
    return outputs.reshape(len(outputs), -1)[:, 0]


def write_predictions(path: Path, outputs: Any, ids: Any, task: str) -> None:
    """``.npy``: the outputs array; ``.csv``: sample id, prediction, then every output value."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    flat = outputs.reshape(len(outputs), -1).numpy()
    if path.suffix == ".npy":
        np.save(path, outputs.numpy(), allow_pickle=False)
        return
    header = "sample_id,prediction," + ",".join(f"out_{i}" for i in range(flat.shape[1]))
    rows = np.column_stack([ids.numpy(), decided(outputs, task).numpy(), flat])
    np.savetxt(path, rows, delimiter=",", header=header, comments="",
               fmt=["%d", "%g"] + ["%.8g"] * flat.shape[1])


def _online(predictor: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One request per input line; one JSON line per answer (errors too, as data)."""
    import torch

    from splitmq.shared import data
    from splitmq.workers import assemble
    from splitmq.workers.roles.requests import PredictionError

    pool = data.pool(assemble.owner_data(cfg, args.client_index))
    row = {int(i): r for r, i in enumerate(pool.ids)}
    answered = 0
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        answer: dict[str, Any] = {"input": text if len(text) <= 40 else text[:37] + "..."}
        started = time.perf_counter()
        try:
            value = json.loads(text)
            if isinstance(value, int) and value in row:
                batch = pool.batch(torch.tensor([row[value]]))
                out = predictor.predict(batch.x, batch.ids)
            elif isinstance(value, list) and not cfg.vertical_parts:
                out = predictor.predict(torch.tensor([value], dtype=torch.float32))
            else:
                raise PredictionError("invalid", "expected a sample id this owner holds, or a list of features")
            answer.update(prediction=decided(out, cfg.task.value).tolist()[0], outputs=out[0].reshape(-1).tolist())
        except (PredictionError, ValueError) as exc:
            answer.update(error=str(exc))
        answer["latency_ms"] = round((time.perf_counter() - started) * 1e3, 3)
        print(json.dumps(answer), flush=True)
        answered += 1
    return {"online_requests": answered}
