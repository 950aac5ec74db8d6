"""The `readapt` command: a thin argparse layer over the typed functions of the package.

Each subcommand has one `_add_<name>(sub)` section below that declares its flags and calls exactly one
public function. Heavy imports (torch, transformers) happen inside the handlers, so `readapt --help`
is fast. Errors of type ReadaptError print one line and exit 2; Ctrl-C exits 130 with no output left.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from readapt import __version__
from readapt.errors import ReadaptError


def _scale_spec(text: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (PATH, SCALE); the scale defaults to 1.0 and may be any real number.

    When both readings name an existing path (a folder literally named 'DIR:0.5' next to 'DIR'), the
    argument is ambiguous and refused; when only the whole text exists, it is that path with scale 1."""
    from pathlib import Path

    head, sep, tail = text.rpartition(":")
    if not text.strip() or (sep and not head.strip() and not Path(text).exists()):
        raise argparse.ArgumentTypeError(f"{text!r} names no adapter: give ADAPTER[:SCALE], e.g. delta/:0.5")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            if not Path(text).exists() and Path(head).exists():
                raise argparse.ArgumentTypeError(f"the scale {tail!r} in {text!r} is not a number") from None
            return text, 1.0
        if Path(text).exists() and Path(head).exists():
            raise argparse.ArgumentTypeError(
                f"{text!r} is ambiguous: it is the path {text!r} (scale 1) and also the path {head!r} with scale "
                f"{tail}; write {text + ':1'!r} for the first or rename one of them")
        if Path(text).exists():
            return text, 1.0
        return head, scale
    return text, 1.0


def _size(text: str) -> int:
    """--max-shard-size: checked when the command line is read, not when the first shard is written."""
    from readapt.checkpoint import parse_size

    try:
        return parse_size(text)
    except ReadaptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device(text: str) -> str:
    """--device: one torch can use here (checked before any model is loaded)."""
    from readapt.checkpoint import parse_device

    try:
        parse_device(text)
    except ReadaptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _dtype(text: str) -> str:
    """--dtype: one readapt computes in and writes (float8 variants are refused with the allowed ones)."""
    from readapt.checkpoint import parse_dtype

    try:
        parse_dtype(text)
    except ReadaptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _wrote(folder) -> int:
    """Tell the user what a job wrote: the folder, its files and size."""
    from pathlib import Path

    files = [f for f in Path(folder).iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    unit, div = next((u, d) for u, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("bytes", 1)) if size >= d or d == 1)
    print(f"wrote {folder} ({len(files)} files, {size / div:.3g} {unit})")
    return 0


def _common_output(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _common_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled .bin/.pt weights (with torch.load(weights_only=True)); refused by default",
    )


# --- extract / merge (checkpoint engine) -------------------------------------------------------------


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="RE-Adapter: delta = TUNED - BASE, streamed tensor by tensor")
    p.add_argument("base", help="pretrained checkpoint: folder or model id in the local HF cache")
    p.add_argument("tuned", help="fine-tuned (e.g. instruct) checkpoint of the same architecture")
    _common_output(p)
    _common_inputs(p)
    p.add_argument("--dtype", default=None, type=_dtype, help="delta dtype (default float32: exact round trip)")
    p.add_argument("--skip-missing", action="store_true", help="skip tensors present on one side only")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")
    # LoRE-Adapter instead of a full delta (readapt.lowrank.extract_lowrank): --tau or --rank
    p.add_argument("--tau", type=float, default=None, help="LoRE: per layer keep the smallest rank whose "
                   "squared singular values reach this share of the layer's (0 < tau <= 1; paper: 0.5)")
    p.add_argument("--rank", type=int, default=None, help="LoRE: fixed rank per layer (clamped, with a warning)")
    p.add_argument("--svd", default="auto", choices=("auto", "exact", "gram", "randomized"),
                   help="LoRE SVD path (auto: gram for --tau, randomized for --rank)")
    p.add_argument("--device", default=None, type=_device, help="LoRE: where the SVDs run (cpu, cuda)")
    p.add_argument("--embeddings", default="lowrank", choices=("lowrank", "dense", "skip"), help="LoRE: embeddings")
    p.add_argument("--lm-head", default="lowrank", choices=("lowrank", "dense", "skip"), help="LoRE: lm_head")
    p.add_argument("--norms", default="dense", choices=("dense", "skip"), help="LoRE: norms (modules_to_save)")
    p.add_argument("--biases", default="dense", choices=("dense", "skip"), help="LoRE: linear biases")

    def run(a):
        if a.tau is not None or a.rank is not None:
            from readapt.lowrank import Policy, extract_lowrank, summary

            print(summary(extract_lowrank(
                a.base, a.tuned, a.output, tau=a.tau, rank=a.rank, svd=a.svd, device=a.device, dtype=a.dtype,
                policy=Policy(a.embeddings, a.lm_head, a.norms, a.biases), skip_missing=a.skip_missing,
                overwrite=a.overwrite, allow_pickle=a.allow_pickle,
            )))
            return
        from readapt.delta import extract

        return _wrote(extract(
            a.base, a.tuned, a.output, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
            max_shard_size=a.max_shard_size, allow_pickle=a.allow_pickle,
        ))

    p.set_defaults(func=run)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="write BASE + sum(scale_i * adapter_i) as a Hugging Face model folder")
    p.add_argument("base", help="base checkpoint: folder or model id in the local HF cache")
    p.add_argument(
        "--add", action="append", default=[], type=_scale_spec, metavar="ADAPTER[:SCALE]",
        help="delta folder, PEFT LoRA/DoRA folder or full checkpoint (its difference from BASE); "
        "scale defaults to 1.0, negative subtracts; repeat for several",
    )
    _common_output(p)
    _common_inputs(p)
    p.add_argument("--dtype", default=None, type=_dtype, help="output dtype (default: the base checkpoint's)")
    p.add_argument("--skip-missing", action="store_true", help="for full-checkpoint adapters: skip one-sided tensors")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")

    def run(a):
        from readapt.merge import merge

        if not a.add:
            raise ReadaptError("merge needs at least one --add ADAPTER[:SCALE]")
        return _wrote(merge(
            a.base, a.output, a.add, dtype=a.dtype, skip_missing=a.skip_missing, overwrite=a.overwrite,
            max_shard_size=a.max_shard_size, allow_pickle=a.allow_pickle,
        ))

    p.set_defaults(func=run)


# --- compress / spectrum (LoRE-Adapt, issue 3) -------------------------------------------------------


def _add_lowrank(sub) -> None:
    def policy_flags(p):
        p.add_argument("--svd", default="auto", choices=("auto", "exact", "gram", "randomized"),
                       help="SVD path (auto: gram for --tau, randomized for --rank; spectrum: gram)")
        p.add_argument("--device", default=None, type=_device, help="where the SVDs run (cpu, cuda)")
        p.add_argument("--embeddings", default="lowrank", choices=("lowrank", "dense", "skip"),
                       help="embeddings: low rank (lora_embedding_A/B), dense, or skip (default lowrank)")
        p.add_argument("--lm-head", default="lowrank", choices=("lowrank", "dense", "skip"),
                       help="lm_head (untied): low rank, dense or skip (default lowrank)")
        p.add_argument("--norms", default="dense", choices=("dense", "skip"),
                       help="norms and other 1-D tensors: dense (PEFT modules_to_save) or skip (default dense)")
        p.add_argument("--biases", default="dense", choices=("dense", "skip"),
                       help="linear biases: dense (PEFT bias='lora_only') or skip (default dense)")

    p = sub.add_parser("compress", help="LoRE-Adapter: low-rank PEFT LoRA from a delta folder (by --tau or --rank)")
    p.add_argument("delta", help="delta folder made by `readapt extract`")
    _common_output(p)
    p.add_argument("--tau", type=float, default=None, help="per layer keep the smallest rank whose squared "
                   "singular values reach this share (0 < tau <= 1; the paper uses 0.5)")
    p.add_argument("--rank", type=int, default=None, help="fixed rank per layer (clamped, with a warning)")
    p.add_argument("--base", default=None, help="base checkpoint for dense tensors (default: the delta's manifest)")
    p.add_argument("--dtype", default=None, type=_dtype, help="factor dtype (default float32)")
    policy_flags(p)

    def run_compress(a):
        from readapt.lowrank import Policy, compress, summary

        print(summary(compress(
            a.delta, a.output, tau=a.tau, rank=a.rank, svd=a.svd, device=a.device, base=a.base, dtype=a.dtype,
            policy=Policy(a.embeddings, a.lm_head, a.norms, a.biases), overwrite=a.overwrite,
        )))

    p.set_defaults(func=run_compress)

    p = sub.add_parser("spectrum", help="singular-value report of a delta: rank at tau, energy, plots (PNG+JSON)")
    p.add_argument("source", help="delta folder, or BASE followed by TUNED")
    p.add_argument("tuned", nargs="?", default=None, help="tuned checkpoint (when SOURCE is the base)")
    _common_output(p)
    _common_inputs(p)
    p.add_argument("--tau", type=float, default=0.5, help="the tau of the per-layer table (default 0.5)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices for figure 2 (default: first, "
                   "middle, last)")
    p.add_argument("--skip-missing", action="store_true", help="skip tensors present on one side only")
    policy_flags(p)

    def run_spectrum(a):
        from readapt.lowrank import Policy, spectrum, summary

        try:
            layers = [int(x) for x in a.layers.split(",")] if a.layers else None
        except ValueError:
            raise ReadaptError(f"--layers {a.layers!r}: give comma-separated layer numbers, e.g. 0,15,31") from None
        print(summary(spectrum(
            a.source, a.tuned, a.output, tau=a.tau, svd="gram" if a.svd == "auto" else a.svd, device=a.device,
            policy=Policy(a.embeddings, a.lm_head, a.norms, a.biases), layers=layers,
            skip_missing=a.skip_missing, overwrite=a.overwrite, allow_pickle=a.allow_pickle,
        )))

    p.set_defaults(func=run_spectrum)


# --- port (PortLLM, issue 5) ---------------------------------------------------------------------------


def _add_port(sub) -> None:
    p = sub.add_parser(
        "port", help="PortLLM: carry a LoRA/DoRA adapter or delta made on an old model version to a new version",
        description="Retarget PATCH (a PEFT LoRA/DoRA adapter or a delta folder made on the old version) to "
        "NEW_BASE, or with --merge write NEW_BASE + PATCH as a model folder. Prints (and writes as port_report.json) "
        "what was carried, adjusted (vocabulary rows matched by the text each token stands for, DoRA magnitudes) or skipped, and why.",
    )
    p.add_argument("patch", help="PEFT LoRA/DoRA adapter folder or delta folder (readapt extract) made on the old version")
    p.add_argument("--to", required=True, metavar="NEW_BASE", help="the new version: folder or model id in the local HF cache")
    p.add_argument("--from", dest="from_", default=None, metavar="OLD_BASE",
                   help="the old version the patch was made on: adds the version drift statistics to the report. "
                   "Without it, the base recorded in the patch (when found locally) is used for DoRA magnitude "
                   "rescaling, modules_to_save patches and the old tokenizer, but no drift is computed")
    _common_output(p, required=False)  # not with --dry-run
    p.add_argument("--merge", action="store_true", help="write NEW_BASE + PATCH as a complete model folder")
    p.add_argument("--strict", action="store_true", help="refuse if any tensor of the patch cannot be carried")
    p.add_argument("--dry-run", action="store_true", help="print the report only; write nothing (no -o needed)")
    p.add_argument("--dtype", default=None, type=_dtype, help="with --merge: output dtype (default: NEW_BASE's)")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")
    _common_inputs(p)

    def run(a):
        from readapt.port import port, summary

        if a.output is None and not a.dry_run:
            raise ReadaptError("port needs -o OUTPUT (or --dry-run to print the report only)")
        report = port(
            a.patch, a.to, None if a.dry_run else a.output, from_=a.from_, merge=a.merge, strict=a.strict,
            overwrite=a.overwrite, dtype=a.dtype, max_shard_size=a.max_shard_size, allow_pickle=a.allow_pickle,
        )
        print(summary(report))
        if a.dry_run:
            print("  dry run: nothing written" + (f" (-o {a.output} ignored)" if a.output else ""))

    p.set_defaults(func=run)


# --- train (knowledge adapters, issue 4) ---------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a knowledge adapter (LoRA/DoRA) on the pretrained BASE with unlabeled text",
        description="Next-token prediction on unlabeled text, packed into max-length blocks with EOS between "
        "documents. Defaults are the RE-Adapt paper's (all linear layers, r=64, alpha=128, dropout 0.05, DoRA, "
        "batch 20, AdamW lr 2e-4, linear schedule). Several GPUs: `accelerate launch -m readapt train ...`.",
    )
    p.add_argument("base", help="PRETRAINED checkpoint: folder or model id in the local HF cache")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help='.jsonl with a "text" field per line, or .txt (one document); repeat for several')
    p.add_argument("--eval-data", action="append", default=None, metavar="FILE",
                   help="held-out text scored (loss, perplexity) before and after training")
    _common_output(p)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    p.add_argument("--alpha", type=float, default=128, help="lora_alpha; scale s = alpha/r (default 128)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--dora", action=argparse.BooleanOptionalAction, default=True,
                   help="DoRA (weight-decomposed LoRA) or plain LoRA (default: DoRA)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate (default 2e-4)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1; the paper: 10)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=20, help="blocks per optimizer step, all GPUs (default 20)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="blocks per forward pass per process; smaller = less memory, same result (gradient "
                   "accumulation); default: the whole per-process batch")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per block (default 1024)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same inputs -> same adapter (default 0)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, 0 = never (default 500)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints live while training (default: OUTPUT.partial; deleted on success)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto: accelerate's configured mixed precision, else bf16 on GPUs that support it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~1/3 more compute")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")

    def run(a):
        from readapt.train import train

        train(
            a.base, a.data, a.output, rank=a.rank, alpha=a.alpha, dropout=a.dropout, dora=a.dora, lr=a.lr,
            epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
            max_length=a.max_length, warmup_steps=a.warmup_steps, seed=a.seed, eval_data=a.eval_data,
            save_every=a.save_every or None, checkpoint_dir=a.checkpoint_dir, resume=a.resume,
            overwrite=a.overwrite, precision=a.precision, gradient_checkpointing=a.gradient_checkpointing,
            quiet=a.quiet,
        )

    p.set_defaults(func=run)


# --- eval / sweep / score (evaluation, issue 6) ---------------------------------------------------------


def _add_eval(sub) -> None:
    def metric_list(text: str) -> list[str]:
        return [m.strip() for m in text.split(",") if m.strip()]

    def json_object(text: str) -> dict:
        import json

        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"enable_thinking\": true}}'")
        return value

    def qa_flags(p: argparse.ArgumentParser) -> None:  # shared by eval and sweep
        p.add_argument("--questions", required=True, help='JSON lines {"id", "question", "answers": [...], "passage_id"?}')
        p.add_argument("--retrieval", choices=("none", "bm25", "oracle"), default="none",
                       help="closed book (default), BM25 over --passages, or each question's gold passage_id")
        p.add_argument("--passages", help='JSON lines {"id", "text"} (for --retrieval bm25/oracle)')
        p.add_argument("--top-k", type=int, default=1, help="BM25 passages in the prompt (paper: 1)")
        p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
        p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (left padded)")
        p.add_argument("--limit", type=int, help="only the first N questions (a quick look)")
        p.add_argument("--dtype", type=_dtype, help="model dtype, e.g. bfloat16 (default: the checkpoint's; float32 "
                       "arithmetic on CPU for a bf16/fp16 one, so that answers do not depend on --batch-size)")
        p.add_argument("--device", type=_device, help="cuda, cpu, mps... (default: cuda when available)")
        p.add_argument("--tokenizer", help="tokenizer folder or id, if MODEL has none (or to override it)")
        p.add_argument("--metrics", type=metric_list, help="comma-separated, default: rouge_l_recall,contains_em")
        p.add_argument("--chat-template-kwargs", type=json_object, metavar="JSON",
                       help="options for the chat template, e.g. '{\"enable_thinking\": true}' (default: reasoning "
                            "off where the template has a switch for it)")
        _common_output(p)

    p = sub.add_parser("eval", help="QA accuracy (RE-Adapt protocol): closed book, BM25 or oracle passage")
    p.add_argument("model", help="model folder or id in the local HF cache (BASE when --add is given)")
    p.add_argument(
        "--add", action="append", default=[], type=_scale_spec, metavar="ADAPTER[:SCALE]",
        help="merged in memory as MODEL + sum(scale * adapter), nothing written; repeat for several",
    )
    qa_flags(p)

    def run_eval(a):
        from readapt.evaluate import evaluate

        evaluate(
            a.model, a.questions, a.output, adds=a.add, retrieval=a.retrieval, passages=a.passages,
            top_k=a.top_k, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, limit=a.limit,
            dtype=a.dtype, device=a.device, tokenizer=a.tokenizer, metrics=a.metrics, overwrite=a.overwrite,
            template_kwargs=a.chat_template_kwargs,
        )

    p.set_defaults(func=run_eval)

    p = sub.add_parser("sweep", help="partial adaptation grid: BASE + alpha*ADAPTER1 (+ beta*ADAPTER2), scored")
    p.add_argument("base", help="base (pretrained) model folder or id in the local HF cache")
    p.add_argument("--add", action="append", required=True, metavar="ADAPTER",
                   help="one or two adapters (first alpha, second beta); the grid supplies the scales")
    p.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="scales for each adapter (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of questions held out to choose the scales; the rest report them (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--select", default="contains_em", help="metric that chooses the best cell (default contains_em)")
    qa_flags(p)

    def run_sweep(a):
        from readapt.evaluate import sweep

        sweep(
            a.base, a.add, a.questions, a.output, grid=a.grid, val_fraction=a.val_fraction,
            seed=a.seed, select=a.select, retrieval=a.retrieval, passages=a.passages, top_k=a.top_k,
            max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, limit=a.limit, dtype=a.dtype,
            device=a.device, tokenizer=a.tokenizer, metrics=a.metrics, overwrite=a.overwrite,
            template_kwargs=a.chat_template_kwargs,
        )

    p.set_defaults(func=run_sweep)

    p = sub.add_parser("score", help="score answers generated elsewhere: Rouge-L recall and contains-EM")
    p.add_argument("predictions", help='JSON lines {"id", "response", "answers": [...]}')
    p.add_argument("-o", "--output", help="also write OUTPUT/summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--metrics", type=metric_list, help="comma-separated, default: rouge_l_recall,contains_em")

    def run_score(a):
        from readapt.evaluate import score

        score(a.predictions, a.output, metrics=a.metrics, overwrite=a.overwrite)

    p.set_defaults(func=run_score)


# --- demo (the demo world, issue 7) --------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="both papers' experiments end to end in a synthetic world, on a CPU in minutes")
    p.add_argument("--quick", action="store_true", help="a smoke test: a smaller world, the same pipeline, one seed "
                   "(about 3 minutes); its verdicts are all 'not testable'")
    p.add_argument("--seeds", type=int, default=None, help="judge over seeds 0..N-1, mean ± std (default 3; 1 with "
                   "--quick); a verdict needs at least 2")
    p.add_argument("--capacity-sweep", action="store_true", help="instead: the closed-book experiments at three "
                   "model sizes (how the RE-Adapt vs fine-tuned instruct gap moves with capacity; slow)")
    p.add_argument("-o", "--output", default=None, help="output folder (default ./readapt-demo, or "
                   "./readapt-capacity with --capacity-sweep; a previous demo there is replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder that is not a demo")
    p.add_argument("--cache-dir", default=None, help="trained models and results (default ~/.cache/readapt/demo, or "
                   "$READAPT_DEMO_CACHE)")

    def run(a):
        from readapt.demoworld import capacity_sweep, demo

        if a.capacity_sweep:
            if a.quick:
                raise ReadaptError("--capacity-sweep and --quick do not go together: the sweep is of the full world")
            capacity_sweep(a.output or "readapt-capacity", seeds=a.seeds, cache_dir=a.cache_dir, overwrite=a.overwrite)
        else:
            demo(a.output or "readapt-demo", quick=a.quick, seeds=a.seeds, cache_dir=a.cache_dir, overwrite=a.overwrite)

    p.set_defaults(func=run)


_SECTIONS = (_add_extract, _add_merge, _add_lowrank, _add_port, _add_train, _add_eval, _add_demo)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="readapt",
        description="Weight arithmetic for open LLMs: RE-Adapt, LoRE-Adapt, partial adaptation, PortLLM.",
    )
    parser.add_argument("--version", action="version", version=f"readapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SECTIONS:
        add(sub)
    return parser


def _terminate(signum, frame):  # SIGTERM, SIGHUP, SIGQUIT behave like Ctrl-C: unwind, remove temporary output
    raise KeyboardInterrupt


_STOPS = [getattr(signal, s) for s in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, s)]


def _one_line(text) -> str:
    """A message as one line: newlines that came with user text (a tensor or file name) are escaped."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _show_warning(message, category, filename, lineno, file=None, line=None):  # one line, no source dump
    print(f"readapt: warning: {_one_line(message)}", file=sys.stderr)


STREAMING = ("extract", "merge", "compress", "spectrum", "port")  # checkpoint jobs: one tensor at a time


def _return_freed_buffers() -> None:
    """glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which
    tensor-sized buffers come from heaps that are not given back: a streaming job's RSS then creeps up by
    tens of MB. Fixing the threshold at 1 MiB (as MALLOC_MMAP_THRESHOLD_=1048576 would) maps every
    tensor buffer on its own and unmaps it when freed. Cost: a page fault per fresh buffer page (merge: no
    change within noise; port at 168M: ~0.5 s on 1.1 s); see benchmarks/README.md."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _offline() -> None:
    """readapt never downloads: every Hugging Face lookup of the process is local (HF_HUB_OFFLINE), also
    huggingface_hub's own side requests (it fetches a registry for its user-agent even when a call passes
    local_files_only=True, as every lookup in readapt does)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # already imported: it read the variable then
        hub.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _offline()
    if args.command in STREAMING:
        _return_freed_buffers()
    for sig in _STOPS:  # a dropped ssh session (SIGHUP) or a kill cleans up as Ctrl-C does
        signal.signal(sig, _terminate)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)  # dependencies' deprecation chatter
    try:
        result = args.func(args)
    except ReadaptError as err:
        print(f"readapt {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"readapt {args.command}: interrupted; the output folder was not written", file=sys.stderr)
        return 130
    except OSError as err:  # the last resort: outputs map their own (checkpoint.output_folder)
        from readapt.errors import os_error

        print(f"readapt {args.command}: error: {_one_line(os_error(err))}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
