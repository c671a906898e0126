"""Your images: a folder of pictures in torchvision's ImageFolder layout, a CNN cut after its
convolution blocks, Adam.

Point ``--images DIR`` at a directory with ``train/<class>/*.png`` and ``test/<class>/*.png``
(any ImageFolder tree); ``--make-digits DIR`` writes such a tree from scikit-learn's bundled 8x8
digits to try it. The data owner runs the conv blocks on its own pictures; the server holds the
classifier. With one batch in flight the split run reproduces local training step by step.

    python examples/your_images.py --make-digits /tmp/digits && python examples/your_images.py --images /tmp/digits
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import splitmq
from _common import arguments, max_step_difference, report, run
from splitmq.workers.launch import PartySpec

SIDE = 16  # pictures are resized to SIDE x SIDE, grey


def make_digits(root: Path) -> None:
    """Write scikit-learn's 1,797 bundled 8x8 digits as PNG files in an ImageFolder tree."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{i:04d}.png")


def images(data_dir: str = "") -> splitmq.Data:
    """The owner's pictures: an ImageFolder per split, decoded and transformed batch by batch."""
    from torchvision import datasets, transforms

    root = Path(data_dir or os.environ.get("SPLITMQ_IMAGES", ""))
    if not (root / "train").is_dir():
        raise ValueError(f"--data-dir {root} must hold train/<class>/... images (ImageFolder layout)")
    shape = transforms.Compose([transforms.Grayscale(), transforms.Resize((SIDE, SIDE)), transforms.ToTensor(),
                                transforms.Normalize((0.5,), (0.5,))])
    train, test = datasets.ImageFolder(root / "train", shape), datasets.ImageFolder(root / "test", shape)
    return splitmq.Data(splitmq.SampleSet(train), splitmq.SampleSet(test, ids=torch.arange(len(test)) + len(train)))


def model() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),   # (B, 8, 8, 8)
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),  # (B, 16, 4, 4)
        ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 4 * 4, 10)),
    ]))


def job(epochs: int, job_id: str = "images") -> splitmq.JobConfig:
    return splitmq.job(job_id=job_id, model="your_images:model", cuts=["pool2"], data="your_images:images",
                       loss="cross_entropy", optimizer="Adam", lr=0.003, epochs=epochs, batch_size=32)


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__.splitlines()[0], epochs=5)
    p.add_argument("--images", help="an ImageFolder tree with train/ and test/")
    p.add_argument("--make-digits", help="write the bundled digits as such a tree here, and stop")
    args = p.parse_args(argv)
    if args.make_digits:
        make_digits(Path(args.make_digits))
        print(f"wrote the digits under {args.make_digits}")
        return 0
    if not args.images:
        p.error("give --images DIR (or --make-digits DIR first)")
    cfg = job(args.epochs, args.job_id or "images")
    owner = PartySpec("owner", "worker", ("--data-dir", args.images))
    summaries = run(cfg, [PartySpec("server", "server"), owner], args)
    local = splitmq.train_local(cfg, data=images(args.images))
    report("your images (ImageFolder, CNN cut after the conv blocks, Adam)", "accuracy",
           summaries["owner"]["test_scores"]["accuracy"], local.test_scores["accuracy"],
           {"largest per-step loss difference": max_step_difference(summaries["owner"]["losses"], local.losses)}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
