"""Command line: ``lora2 train | eval | merge | report`` (also ``python -m lora2``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("lora2")

EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="sst2",
                   help="built-in dataset (sst2: GLUE SST-2 subset shipped with lora2); 'none' to use files")
    g.add_argument("--train-file", help="CSV / TSV / JSON Lines training file (overrides --dataset)")
    g.add_argument("--validation-file", help="CSV / TSV / JSON Lines evaluation file")
    g.add_argument("--task", default="classification", choices=["classification", "regression", "causal-lm"])
    g.add_argument("--text-column", default="sentence")
    g.add_argument("--text-pair-column", help="second sentence column for sentence-pair tasks")
    g.add_argument("--label-column", default="label")
    g.add_argument("--max-length", type=_positive_int, default=64, help="tokens per example (longer rows are truncated)")
    g.add_argument("--max-eval-samples", type=_positive_int, default=500)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora2", description="LoRA² fine-tuning for transformers models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model with LoRA²",
                       description="Fine-tune with LoRA². Defaults: all-MiniLM-L6-v2 on the shipped SST-2 subset.")
    t.add_argument("--model", default="minilm", help="local model folder, or 'minilm' (the offline default)")
    t.add_argument("--method", default="lora2", choices=["lora2", "lora", "adalora", "full"],
                   help="lora2, or a baseline with PEFT's defaults (for comparisons; see `lora2 compare`)")
    t.add_argument("--output-dir", default="runs/lora2-sst2")
    t.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the killed run in OUTPUT_DIR from its checkpoint")
    _add_data_args(t)
    g = t.add_argument_group("training")
    g.add_argument("--max-train-samples", type=_positive_int, default=2000)
    g.add_argument("--epochs", type=float, default=2.0)
    g.add_argument("--max-steps", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--eval-batch-size", type=_positive_int, default=64)
    g.add_argument("--grad-accum", type=_positive_int, default=1)
    g.add_argument("--learning-rate", type=float,
                   help="AdamW lr; default per method: lora2 2e-2 (λ moves ~lr per step), lora 5e-4, adalora 8e-4, "
                        "full 5e-5")
    g.add_argument("--head-learning-rate", type=float)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.06)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--eval-every", type=_positive_int, default=50)
    g.add_argument("--log-every", type=_positive_int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    m = t.add_argument_group("LoRA²")
    # long names too: torchrun's own parser takes a bare --r for an abbreviation of its --rdzv-* options
    m.add_argument("--r", "--initial-rank", dest="r", type=int, default=8, help="initial singular values per module")
    m.add_argument("--k", "--inner-width", dest="k", type=int, default=8, help="inner width of the two small LoRAs")
    m.add_argument("--target-rank", type=int, default=6, help="average kept singular values after pruning")
    m.add_argument("--alpha", type=float, default=16.0)
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--init", default="orthogonal", choices=["orthogonal", "normal"], help="factor init (see LoRA2Config)")
    m.add_argument("--target-modules", nargs="+", help="module-name suffixes (default: per architecture)")
    m.add_argument("--modules-to-save", nargs="+", help="extra modules trained fully (default: the head)")
    m.add_argument("--init-warmup", type=int, help="steps before pruning (default 10%% of the run)")
    m.add_argument("--final-warmup", type=int, help="steps with a frozen pattern at the end (default 30%%)")
    m.add_argument("--mask-interval", type=int, help="prune every N steps (default run/50)")
    m.add_argument("--beta1", type=float, default=0.85)
    m.add_argument("--beta2", type=float, default=0.85)
    m.add_argument("--orth-reg-weight", type=float, default=0.1)

    e = sub.add_parser("eval", help="evaluate a base model with a saved adapter")
    e.add_argument("--model", default="minilm")
    e.add_argument("--adapter", required=True, help="folder written by save_pretrained / lora2 train")
    e.add_argument("--eval-batch-size", type=_positive_int, default=64)
    _add_data_args(e)

    mg = sub.add_parser("merge", help="fold an adapter into its base model and save a plain transformers model")
    mg.add_argument("--model", default="minilm")
    mg.add_argument("--adapter", required=True)
    mg.add_argument("--output", required=True, help="folder for the merged model (save_pretrained format)")
    mg.add_argument("--task", default="classification", choices=["classification", "regression", "causal-lm"])

    c = sub.add_parser("compare", help="LoRA² vs full fine-tuning, PEFT LoRA and AdaLoRA on three real tasks",
                       description="Train every method on every task and seed with the same loop, steps and "
                                   "evaluation; write results.md / results.json and plots to --output-dir. The "
                                   "default (small sets, 40 steps) takes ~25 min on 2 CPU cores.")
    c.add_argument("--model", default="minilm")
    c.add_argument("--output-dir", default="runs/compare")
    c.add_argument("--tasks", nargs="+", default=["sst2", "qa-match", "adjective-polarity"])
    c.add_argument("--methods", nargs="+", default=["full", "lora", "adalora", "lora2", "lora2-tiny"])
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--max-steps", type=_positive_int, help="optimiser steps per run (default 40; --full: 3 epochs)")
    c.add_argument("--batch-size", type=_positive_int)
    c.add_argument("--full", action="store_true", help="whole training/validation sets, 3 epochs (a GPU's job)")
    c.add_argument("--no-progress", action="store_true")

    rp = sub.add_parser("report", help="parameter table and rank-allocation heatmap of a saved adapter")
    rp.add_argument("--model", default="minilm")
    rp.add_argument("--adapter", required=True)
    rp.add_argument("--task", default="classification", choices=["classification", "regression", "causal-lm"])
    rp.add_argument("--plot", help="PNG path for the heatmap (default ADAPTER/rank_allocation.png)")
    rp.add_argument("--json", action="store_true", help="print the table as JSON")
    return parser


def _lora2_fields(args: argparse.Namespace) -> dict:
    fields = {"r": args.r, "k": args.k, "target_rank": args.target_rank, "alpha": args.alpha, "dropout": args.dropout, "init": args.init,
              "beta1": args.beta1, "beta2": args.beta2, "orth_reg_weight": args.orth_reg_weight}
    for name in ("target_modules", "modules_to_save", "init_warmup", "final_warmup", "mask_interval"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    from .config import LoRA2Config

    LoRA2Config(**{k: v for k, v in fields.items() if k not in ("init_warmup", "final_warmup", "mask_interval")})
    return fields


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, TrainingInterrupted, train

    if args.resume:
        path = Path(args.resume) / "train_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --resume needs the output folder of an earlier run.")
        cfg = TrainConfig(**json.loads(path.read_text(encoding="utf-8")))
    else:
        from .compare import METHODS

        dataset = None if args.train_file or args.dataset == "none" else args.dataset
        preset = next(m for m in METHODS if m.method == args.method)  # the method's published defaults
        cfg = TrainConfig(
            model=args.model, method=args.method, output_dir=args.output_dir, dataset=dataset, train_file=args.train_file,
            validation_file=args.validation_file, task=args.task, text_column=args.text_column,
            text_pair_column=args.text_pair_column, label_column=args.label_column, max_length=args.max_length,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
            grad_accum=args.grad_accum, learning_rate=args.learning_rate or preset.learning_rate, head_learning_rate=args.head_learning_rate,
            weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, precision=args.precision,
            eval_every=args.eval_every, log_every=args.log_every, seed=args.seed, lora2=_lora2_fields(args),
            method_settings={} if args.method == "lora2" else dict(preset.settings))
    try:
        result = train(cfg, resume=bool(args.resume), progress=not args.no_progress)
    except TrainingInterrupted as e:
        logger.error("%s", e)
        return EXIT_INTERRUPTED
    logger.info("%s before: %.4f  after: %.4f  (best %.4f) in %d steps, %.0f s; %s trainable parameters",
                result.metric_name, result.metric_before, result.metric_after, result.best_metric, result.steps,
                result.seconds, f"{result.trainable_parameters:,}")
    print(json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "history"}, indent=2))  # noqa: T201
    return 0


def _load_adapted(model: str, adapter: str, task: str):
    from .model import LoRA2Model, read_adapter_meta
    from .train import load_base_model, resolve_model_path

    meta = read_adapter_meta(Path(adapter))
    path = resolve_model_path(model)
    num_labels = int(meta.get("num_labels") or 2)  # the head the adapter was trained with
    base = load_base_model(path, task, num_labels)
    return path, LoRA2Model.from_pretrained(base, adapter)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import Collator, build_dataset, builtin_dataset_files
    from .train import evaluate, load_tokenizer

    path, model = _load_adapted(args.model, args.adapter, args.task)
    tokenizer = load_tokenizer(path)
    validation = args.validation_file
    if validation is None:
        if args.dataset in (None, "none"):
            raise ValueError("give --validation-file or a built-in --dataset.")
        validation = str(builtin_dataset_files(args.dataset)[1])
    label = None if args.task == "causal-lm" else args.label_column
    data = build_dataset(validation, tokenizer, args.task, args.text_column, label, args.text_pair_column,
                         args.max_length, max_samples=args.max_eval_samples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), data, Collator(tokenizer.pad_token_id, args.task), args.eval_batch_size, device)
    print(json.dumps(metrics, indent=2))  # noqa: T201
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .io import atomic_write_dir
    from .train import load_tokenizer

    path, model = _load_adapted(args.model, args.adapter, args.task)
    merged = model.merge_and_unload()

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        load_tokenizer(path).save_pretrained(tmp)

    atomic_write_dir(args.output, fill)
    logger.info("merged model written to %s (load it with from_pretrained; no lora2 needed)", args.output)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .accounting import parameter_report
    from .report import plot_rank_heatmap

    _, model = _load_adapted(args.model, args.adapter, args.task)
    report = parameter_report(model)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))  # noqa: T201
    else:
        print(report.format_table())  # noqa: T201
    plot = Path(args.plot) if args.plot else Path(args.adapter) / "rank_allocation.png"
    plot_rank_heatmap(model.rank_pattern(), model.lora2_config.r, plot, title=f"LoRA² rank allocation: {args.adapter}")
    logger.info("heatmap written to %s", plot)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare

    overrides = {"model": args.model, "output_dir": args.output_dir, "tasks": args.tasks, "methods": args.methods,
                 "seeds": args.seeds}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    cfg = CompareConfig.full(**overrides) if args.full else CompareConfig(**overrides)
    compare(cfg, command="lora2 " + " ".join(sys.argv[1:]), progress=not args.no_progress)
    results = Path(cfg.output_dir) / "results.md"
    print(results.read_text(encoding="utf-8"))  # noqa: T201
    logger.info("tables, JSON and plots written to %s", cfg.output_dir)
    return 0


COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "eval": _cmd_eval, "merge": _cmd_merge, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, TypeError, ImportError) as e:  # bad input, files or set-up: the message says the fix
        logger.error("%s", e)
        return 2
    except TrainingError as e:  # diverged: the message names the step and the last good checkpoint
        logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
