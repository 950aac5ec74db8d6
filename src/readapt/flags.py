"""What each `readapt` subcommand accepts: its flags (argparse declarations, the argument types that check
them as the command line is read) and what the parsed flags mean for the call (ReadOptions, Policy,
TrainSettings, the keyword arguments eval and sweep share). readapt.cli says which function each command calls.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields

from readapt.checkpoint import ReadOptions, parse_size
from readapt import userfiles
from readapt.errors import ReadaptError
from readapt.loreplan import EMBEDDING_POLICIES, VECTOR_POLICIES, Policy
from readapt.numerics import parse_device, parse_dtype
from readapt.training import TrainSettings


# --- argument types: checked when the command line is read -----------------------------------------------


def scale_spec(text: str) -> tuple[str, float]:
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


def _checked(parse: Callable) -> Callable[[str], str]:
    """An argparse type that refuses what `parse` refuses (its one-line error) and keeps the text."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ReadaptError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


_size, _device, _dtype = _checked(parse_size), _checked(parse_device), _checked(parse_dtype)


def _metric_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _json_object(text: str) -> dict:
    """A JSON object given on the command line, parsed as strictly as readapt's JSON files (userfiles.parse:
    no NaN, no repeated keys, no nesting too deep for the parser)."""
    try:
        return userfiles.parse(text, "the value", dict)
    except ReadaptError as err:
        what = str(err).split("; ")[0]  # without the advice about files
        raise argparse.ArgumentTypeError(f"{what}; write a JSON object such as '{{\"enable_thinking\": true}}'") from None


# --- flags shared by several commands ---------------------------------------------------------------------


def _output(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin/.pt weights (with torch.load(weights_only=True)); refused by default")


def _adds(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--add", action="append", default=[], type=scale_spec, metavar="ADAPTER[:SCALE]", help=help)


def _calibration(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE", help=help)


# the LoRE flags (the SVD and Policy's fields): extract shows them short, after "LoRE:"; compress, spectrum in full
_LORE_HELP = {
    "svd": ("LoRE SVD path (auto: gram for --tau, randomized for --rank)",
            "SVD path (auto: gram for --tau, randomized for --rank; spectrum: gram)"),
    "device": ("LoRE: where the SVDs run (cpu, cuda)", "where the SVDs run (cpu, cuda)"),
    "embeddings": ("LoRE: embeddings (auto: lowrank, or dense when tied to lm_head)",
                   "embeddings: low rank (lora_embedding_A/B), dense, or skip (default auto: lowrank, or dense, as "
                   "PEFT trainable tokens, when tied to lm_head)"),
    "lm_head": ("LoRE: lm_head", "lm_head (untied): low rank, dense or skip (default lowrank)"),
    "norms": ("LoRE: norms (modules_to_save)",
              "norms and other 1-D tensors: dense (PEFT modules_to_save) or skip (default dense)"),
    "biases": ("LoRE: linear biases", "linear biases: dense (PEFT bias='lora_only') or skip (default dense)"),
}
_POLICY_CHOICES = {"embeddings": ("auto",) + EMBEDDING_POLICIES, "lm_head": EMBEDDING_POLICIES,
                   "norms": VECTOR_POLICIES, "biases": VECTOR_POLICIES}


def _lore(p: argparse.ArgumentParser, short: bool) -> None:
    """--svd, --device and a flag per Policy field (its default from Policy)."""
    helps = {k: v[0] if short else v[1] for k, v in _LORE_HELP.items()}
    p.add_argument("--svd", default="auto", choices=("auto", "exact", "gram", "randomized"), help=helps["svd"])
    p.add_argument("--device", default=None, type=_device, help=helps["device"])
    for f in fields(Policy):
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, choices=_POLICY_CHOICES[f.name],
                       help=helps[f.name])


# --- extract, merge ------------------------------------------------------------------------------------


def extract_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="pretrained checkpoint: folder or model id in the local HF cache")
    p.add_argument("tuned", help="fine-tuned (e.g. instruct) checkpoint of the same architecture")
    _output(p)
    _inputs(p)
    p.add_argument("--dtype", default=None, type=_dtype, help="delta dtype (default float32: exact round trip)")
    p.add_argument("--skip-missing", action="store_true", help="skip tensors present on one side only")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")
    # a LoRE-Adapter instead of a full delta (the row "extract --tau"): --tau or --rank
    p.add_argument("--tau", type=float, default=None, help="LoRE: per layer keep the smallest rank whose "
                   "squared singular values reach this share of the layer's (0 < tau <= 1; paper: 0.5)")
    p.add_argument("--rank", type=int, default=None, help="LoRE: fixed rank per layer (clamped, with a warning)")
    _calibration(p, "LoRE: text (.jsonl {\"text\"} or .txt) on which to report the adapter's mean KL to TUNED "
                    "per token and top-1 agreement")
    _lore(p, short=True)


def merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base checkpoint: folder or model id in the local HF cache")
    _adds(p, "delta folder, PEFT LoRA/DoRA folder or full checkpoint (its difference from BASE); "
          "scale defaults to 1.0, negative subtracts; repeat for several")
    _output(p)
    _inputs(p)
    p.add_argument("--dtype", default=None, type=_dtype, help="output dtype (default: the base checkpoint's); with "
                   "--as-lora the factors' dtype (default float32)")
    p.add_argument("--skip-missing", action="store_true", help="for full-checkpoint adapters: skip one-sided tensors")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")
    p.add_argument("--whole-tensors", action="store_true", help="LoRA/DoRA terms on whole tensors, not in blocks "
                   "of rows: PEFT's merge bit for bit also for DoRA on large embeddings, at ~2.4x the largest tensor")
    # the fold (the row "merge --as-lora"): the same sum written as one PEFT LoRA on BASE
    p.add_argument("--as-lora", action="store_true", help="write the merge as ONE PEFT LoRA adapter on BASE: exact "
                   "(LoRA factors concatenated) for LoRA addends, or with --rank/--tau the best low-rank fit of the "
                   "sum (needed for deltas, checkpoints, DoRA)")
    p.add_argument("--rank", type=int, default=None, help="--as-lora: fixed rank per module (LoRE's rule)")
    p.add_argument("--tau", type=float, default=None, help="--as-lora: per module keep the smallest rank whose "
                   "squared singular values reach this share of the sum's (0 < tau <= 1)")
    _calibration(p, "--as-lora: text (.jsonl {\"text\"} or .txt) on which to report mean KL(merged ‖ BASE + "
                    "adapter) per token and top-1 agreement")
    _lore(p, short=True)


# --- compress, spectrum ---------------------------------------------------------------------------------


def compress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", help="delta folder made by `readapt extract`")
    _output(p)
    p.add_argument("--tau", type=float, default=None, help="per layer keep the smallest rank whose squared "
                   "singular values reach this share (0 < tau <= 1; the paper uses 0.5)")
    p.add_argument("--rank", type=int, default=None, help="fixed rank per layer (clamped, with a warning)")
    p.add_argument("--base", default=None, help="base checkpoint for dense tensors (default: the delta's manifest)")
    p.add_argument("--dtype", default=None, type=_dtype, help="factor dtype (default float32)")
    _calibration(p, "text (.jsonl {\"text\"} or .txt) on which to report the adapter's mean KL to base + delta "
                    "per token and top-1 agreement (needs the base)")
    _lore(p, short=False)
    _inputs(p)


def spectrum_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="delta folder, or BASE followed by TUNED")
    p.add_argument("tuned", nargs="?", default=None, help="tuned checkpoint (when SOURCE is the base)")
    _output(p)
    _inputs(p)
    p.add_argument("--tau", type=float, default=0.5, help="the tau of the per-layer table (default 0.5)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices for figure 2 (default: first, "
                   "middle, last)")
    p.add_argument("--skip-missing", action="store_true", help="skip tensors present on one side only")
    _lore(p, short=False)


# --- port, train ----------------------------------------------------------------------------------------


def port_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("patch", help="PEFT LoRA/DoRA adapter folder or delta folder (readapt extract) made on the old "
                   "version")
    p.add_argument("--to", required=True, metavar="NEW_BASE",
                   help="the new version: folder or model id in the local HF cache")
    p.add_argument("--from", dest="from_", default=None, metavar="OLD_BASE",
                   help="the old version the patch was made on: adds the version drift statistics to the report. "
                   "Without it, the base recorded in the patch (when found locally) is used for DoRA magnitude "
                   "rescaling, modules_to_save patches and the old tokenizer, but no drift is computed")
    _output(p, required=False)  # not with --dry-run
    p.add_argument("--merge", action="store_true", help="write NEW_BASE + PATCH as a complete model folder")
    p.add_argument("--strict", action="store_true", help="refuse if any tensor of the patch cannot be carried")
    p.add_argument("--dry-run", action="store_true", help="print the report only; write nothing (no -o needed)")
    p.add_argument("--dtype", default=None, type=_dtype, help="with --merge: output dtype (default: NEW_BASE's)")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="largest output shard (e.g. 5GB, 500MB)")
    p.add_argument("--whole-tensors", action="store_true", help="with --merge: LoRA/DoRA terms on whole tensors, "
                   "not in blocks of rows: PEFT's merge bit for bit also for DoRA on large embeddings, at ~2.4x the "
                   "largest tensor")
    _inputs(p)


TRAIN_FLAGS = [f for f in fields(TrainSettings) if f.metadata["cli"]]  # TrainSettings' fields with a flag


def train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="PRETRAINED checkpoint: folder or model id in the local HF cache")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help='.jsonl with a "text" field per line, or .txt (one document); repeat for several')
    p.add_argument("--eval-data", action="append", default=None, metavar="FILE",
                   help="held-out text scored (loss, perplexity) before and after training")
    _output(p)
    for f in TRAIN_FLAGS:
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata["cli"])


# --- eval, sweep, score, demo ---------------------------------------------------------------------------


def _qa_flags(p: argparse.ArgumentParser) -> None:
    """The flags eval and sweep share: questions, retrieval, generation, model, metrics, output."""
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
    p.add_argument("--metrics", type=_metric_list, help="comma-separated, default: rouge_l_recall,contains_em")
    p.add_argument("--chat-template-kwargs", type=_json_object, metavar="JSON",
                   help="options for the chat template, e.g. '{\"enable_thinking\": true}' (default: reasoning "
                        "off where the template has a switch for it)")
    _output(p)
    _inputs(p)


def eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or id in the local HF cache (BASE when --add is given)")
    _adds(p, "merged in memory as MODEL + sum(scale * adapter), nothing written; repeat for several")
    _qa_flags(p)


def sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base (pretrained) model folder or id in the local HF cache")
    p.add_argument("--add", action="append", required=True, metavar="ADAPTER",
                   help="one or two adapters (first alpha, second beta); the grid supplies the scales")
    p.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="scales for each adapter (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of questions held out to choose the scales; the rest report them (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--select", default="contains_em", help="metric that chooses the best cell (default contains_em)")
    _qa_flags(p)


def score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", help='JSON lines {"id", "response", "answers": [...]}')
    p.add_argument("-o", "--output", help="also write OUTPUT/summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--metrics", type=_metric_list, help="comma-separated, default: rouge_l_recall,contains_em")


def demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smoke test: a smaller world, the same pipeline, one seed "
                   "(1-2 minutes); its verdicts are all 'not testable'")
    p.add_argument("--seeds", type=int, default=None, help="judge over seeds 0..N-1, mean ± std (default 3; 1 with "
                   "--quick); a verdict needs at least 2")
    p.add_argument("--capacity-sweep", action="store_true", help="instead: the closed-book experiments at three "
                   "model sizes (how the RE-Adapt vs fine-tuned instruct gap moves with capacity; slow)")
    p.add_argument("-o", "--output", default=None, help="output folder (default ./readapt-demo, or "
                   "./readapt-capacity with --capacity-sweep; a previous demo there is replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder that is not a demo")
    p.add_argument("--cache-dir", default=None, help="trained models and results (default ~/.cache/readapt/demo, or "
                   "$READAPT_DEMO_CACHE)")


# --- what the flags mean for the call ------------------------------------------------------------------


def read_options(a: argparse.Namespace) -> ReadOptions:
    return ReadOptions(allow_pickle=a.allow_pickle)


def policy(a: argparse.Namespace) -> Policy:
    return Policy(**{f.name: getattr(a, f.name) for f in fields(Policy)})


def qa_kwargs(a) -> dict:
    """The keyword arguments eval and sweep take from the shared flags."""
    return dict(retrieval=a.retrieval, passages=a.passages, top_k=a.top_k, max_new_tokens=a.max_new_tokens,
                batch_size=a.batch_size, limit=a.limit, dtype=a.dtype, device=a.device, tokenizer=a.tokenizer,
                metrics=a.metrics, overwrite=a.overwrite, template_kwargs=a.chat_template_kwargs, read=read_options(a))


def train_settings(a: argparse.Namespace) -> TrainSettings:
    return TrainSettings(**{f.name: getattr(a, f.name) for f in TRAIN_FLAGS})
