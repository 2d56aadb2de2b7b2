"""``tta continual``: parse options into a :class:`ContinualConfig`, run it resumably, print the report.

Examples::

    tta continual --out runs/digits                       # split-digits, ER + BN, no download
    tta continual --benchmark split-cifar10 --data PATH --method er --norm adab2n --buffer 500 \\
        --batch-size 10 --epochs 1 --seeds 0,1,2 --out DIR
    tta continual --benchmark split-cifar10 --method nmc --backbone cifar10_resnet56 --weights PATH --out DIR
    tta continual --benchmark random-labels --method sgd --norm nap --tasks 10 --out DIR
    tta continual --method nmc --pretrain-classes 5 --out DIR   # cnn pre-trained on digits 0-4; NMC on 5-9
    tta continual --method linear_probe --pretrain-classes 5 --out DIR   # its upper bound (same backbone)
    tta continual --method sgd --pretrain-classes 5 --out DIR            # its lower bound: fine-tuning
"""
from __future__ import annotations

import argparse
from pathlib import Path

from continual.config import METHODS, NORMS, SCHEDULES, ContinualConfig


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from error


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ContinualConfig()
    g = parser.add_argument_group("task stream")
    g.add_argument("--benchmark", default=d.benchmark,
                   choices=["split-digits", "split-cifar10", "split-cifar100", "random-labels"],
                   help="task stream (default: split-digits, embedded, no download)")
    g.add_argument("--data", default=None, help="dataset: 'digits', an ImageFolder .zip/folder with train/ and "
                   "test/, or a folder with the CIFAR python layout (default: digits, or the shared CIFAR-10 zip)")
    g.add_argument("--tasks", type=int, default=None, help="number of tasks (default: 5; 10 for cifar100 and "
                   "random-labels)")
    g.add_argument("--n-train", type=int, default=None, help="seeded class-balanced training subset size")
    g.add_argument("--n-test", type=int, default=None, help="seeded class-balanced test subset size")
    g.add_argument("--image-size", type=int, default=None, help="digits resolution (default 32; 16 for "
                   "random-labels)")
    g.add_argument("--shuffle-classes", action="store_true", help="seeded class order instead of 0..C-1")
    g = parser.add_argument_group("method")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="sgd (fine-tuning), er / er_ace (joint-forward replay), nmc (nearest mean, frozen backbone), "
                        "linear_probe (softmax layer refitted on every feature seen so far: NMC's upper bound)")
    g.add_argument("--norm", default=d.norm, choices=NORMS,
                   help="bn (default): the model's BatchNorm; none: no normalisation; adab2n: BN replaced by "
                        "AdaB2N; layer / rms: LayerNorm / RMSNorm inserted before every nonlinearity; nap: inserted "
                        "norm + projection. Not for a loaded --backbone (nmc, linear_probe): it keeps its own "
                        "layers")
    g.add_argument("--model", default=None, choices=["resnet18-reduced", "cnn", "mlp"],
                   help="trained (or, with --pretrain-classes, pre-trained) network (default: resnet18-reduced for "
                        "CIFAR, cnn for digits, mlp for random-labels)")
    g.add_argument("--width", type=int, default=None, help="ResNet nf (default 20) or CNN width (default 32)")
    g.add_argument("--hidden", type=_ints, default=d.hidden, help="MLP hidden widths, comma-separated")
    g.add_argument("--epochs", type=int, default=None, help="passes per task (default 1: online)")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size (default 10)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam"])
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=SCHEDULES,
                   help="explicit learning-rate schedule: linear / cosine over all steps of the run, or a cosine "
                        "restarted at every task")
    g.add_argument("--buffer", type=int, default=d.buffer, help="replay buffer size (reservoir)")
    g.add_argument("--replay-batch-size", type=int, default=None, help="replay samples per step (default: "
                   "the batch size)")
    g = parser.add_argument_group("AdaB2N")
    g.add_argument("--kappa", type=float, default=d.kappa, help="momentum interpolation: 0 -> 1/t, 1 -> BN")
    g.add_argument("--lambda-reg", type=float, default=d.lambda_reg, help="weight of the statistics regulariser")
    g.add_argument("--adab2n-prior", default=d.adab2n_prior, choices=["seen", "present"],
                   help="tasks in the Dirichlet normaliser: seen so far (authors' code) or present in the batch")
    g.add_argument("--reg-start-task", type=int, default=d.reg_start_task)
    g = parser.add_argument_group("NaP")
    g.add_argument("--nap-kind", default=d.nap_kind, choices=["layer", "rms"])
    g.add_argument("--nap-every", type=int, default=d.nap_every, help="project every k optimiser steps")
    g.add_argument("--nap-project-output", action="store_true", help="also project the output layer's weight")
    g.add_argument("--nap-no-affine", action="store_true", help="do not project the norms' (gamma, beta)")
    g = parser.add_argument_group("NMC")
    g.add_argument("--backbone", default=None, help="pretrained feature extractor (default cifar10_resnet56)")
    g.add_argument("--weights", default=None, help="backbone checkpoint (default: the akamaster file in the shared "
                   "data folder, $TTA_SHARED_DATA/models/akamaster-resnet-cifar10/)")
    g.add_argument("--download", action="store_true", help="download the backbone's published weights when no "
                   "file is found (network); data is never downloaded: give it with --data")
    g.add_argument("--nmc-metric", default=d.nmc_metric, choices=["euclidean", "cosine"])
    g.add_argument("--nmc-renormalize", action="store_true", help="unit-normalise the class means")
    g.add_argument("--probe-l2", type=float, default=d.probe_l2, help="linear_probe: L2 weight of the softmax layer")
    g = parser.add_argument_group("pre-trained backbone (class-incremental for real)")
    g.add_argument("--pretrain-classes", type=int, default=None, metavar="K",
                   help="pre-train --model on the training images of the first K classes of the class order only "
                        "(cross-entropy), then learn the other classes incrementally: frozen under nmc and "
                        "linear_probe, fine-tuned with a fresh head by the trained methods. Not with "
                        "--backbone/--weights/--download")
    g.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help=f"pre-training epochs (default {d.pretrain_epochs})")
    g.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr,
                   help=f"pre-training SGD learning rate, momentum 0.9, cosine to 0 (default {d.pretrain_lr})")
    g.add_argument("--pretrain-batch-size", type=int, default=d.pretrain_batch_size,
                   help=f"pre-training batch size (default {d.pretrain_batch_size})")
    g = parser.add_argument_group("run")
    g.add_argument("--seeds", type=_seeds, default=d.seeds, help="comma-separated seeds (default 0)")
    g.add_argument("--out", required=True, help="output folder (rerunning with the same folder resumes)")
    g.add_argument("--device", default=d.device)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--stop-after", type=int, default=None, help="stop each seed after this many tasks "
                   "(a later run with the same --out continues)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> ContinualConfig:
    return ContinualConfig(
        benchmark=args.benchmark, data=args.data, method=args.method, norm=args.norm, model=args.model,
        width=args.width, hidden=list(args.hidden), tasks=args.tasks, n_train=args.n_train, n_test=args.n_test,
        image_size=args.image_size, shuffle_classes=args.shuffle_classes, epochs=args.epochs,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, buffer=args.buffer,
        replay_batch_size=args.replay_batch_size, kappa=args.kappa, lambda_reg=args.lambda_reg,
        adab2n_prior=args.adab2n_prior, reg_start_task=args.reg_start_task, nap_kind=args.nap_kind,
        nap_every=args.nap_every, nap_project_output=args.nap_project_output,
        nap_project_affine=not args.nap_no_affine, backbone=args.backbone, weights=args.weights,
        nmc_metric=args.nmc_metric, nmc_renormalize=args.nmc_renormalize, probe_l2=args.probe_l2,
        pretrain_classes=args.pretrain_classes, pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr,
        pretrain_batch_size=args.pretrain_batch_size, seeds=args.seeds, device=args.device, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from continual.report import print_report
    from continual.runner import ConfigMismatch, run_experiment

    try:
        config = config_from_args(args).resolved()
        if args.download and config.pretrain_classes is not None:
            raise ValueError(f"--pretrain-classes {config.pretrain_classes} and --download both choose the feature "
                             "extractor (--download fetches a --backbone's published weights): give one of them")
    except ValueError as error:  # an invalid combination of options
        print(f"tta continual: {error}")
        return 2
    try:
        result = run_experiment(config, args.out, progress=not args.no_progress, stop_after=args.stop_after,
                                download=args.download)
    except ConfigMismatch as error:
        print(f"tta continual: {error}")
        return 2
    print(print_report(result))
    print(f"results in {args.out} ({', '.join(written_files(Path(args.out)))})")
    if result["incomplete_seeds"]:
        print(f"seed(s) {', '.join(map(str, result['incomplete_seeds']))} not finished (--stop-after); the same "
              "command without --stop-after continues them")
    return 0


def written_files(out: Path) -> list[str]:
    """The report files present in ``out``, in the order a user looks for them."""
    names = ("results.jsonl", "timings.jsonl", "config.json", "summary.md", "summary.json", "accuracy_matrix.md",
             "accuracy_matrix.csv", "accuracy_matrix_seeds.csv", "heatmap.png")
    return [name for name in names if (out / name).exists()]
