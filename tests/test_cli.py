"""The `readapt` command line: every subcommand's flags reach the function its row of cli.COMMANDS names.

Each case patches the row's function with a recorder, runs `readapt.cli.main(argv)` and compares the
positional and keyword arguments received with the ones written out here; `test_every_flag_is_exercised`
checks that the cases together use every flag each subparser declares, so a flag added without a case
(or dropped on the way to the function) fails here."""

from __future__ import annotations

import dataclasses
import signal
import warnings

import pytest

from readapt import cli
from readapt.checkpoint import ReadOptions
from readapt.loreplan import Policy
from readapt.training import TrainSettings

PICKLE, NO_PICKLE = ReadOptions(allow_pickle=True), ReadOptions(allow_pickle=False)
QA_FLAGS = ["--questions", "q.jsonl", "--retrieval", "bm25", "--passages", "p.jsonl", "--top-k", "3",
            "--max-new-tokens", "8", "--batch-size", "2", "--limit", "5", "--dtype", "bfloat16", "--device", "cpu",
            "--tokenizer", "tok", "--metrics", "contains_em, rouge_l_recall", "--chat-template-kwargs",
            '{"enable_thinking": true}', "-o", "out", "--overwrite", "--allow-pickle"]
QA_KWARGS = dict(retrieval="bm25", passages="p.jsonl", top_k=3, max_new_tokens=8, batch_size=2, limit=5,
                 dtype="bfloat16", device="cpu", tokenizer="tok", metrics=["contains_em", "rouge_l_recall"],
                 overwrite=True, template_kwargs={"enable_thinking": True}, read=PICKLE)
QA_DEFAULTS = dict(retrieval="none", passages=None, top_k=1, max_new_tokens=64, batch_size=16, limit=None, dtype=None,
                   device=None, tokenizer=None, metrics=None, overwrite=False, template_kwargs=None, read=NO_PICKLE)
TRAIN_FLAGS = ["--rank", "8", "--alpha", "16", "--dropout", "0.1", "--no-dora", "--lr", "1e-3", "--epochs", "2",
               "--max-steps", "5", "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "64",
               "--warmup-steps", "1", "--seed", "3", "--save-every", "0", "--checkpoint-dir", "ck", "--resume",
               "--precision", "no", "--gradient-checkpointing", "--quiet"]
TRAINED = TrainSettings(rank=8, alpha=16.0, dropout=0.1, dora=False, lr=1e-3, epochs=2.0, max_steps=5, batch_size=4,
                        micro_batch_size=2, max_length=64, warmup_steps=1, seed=3, save_every=0, checkpoint_dir="ck",
                        resume=True, precision="no", gradient_checkpointing=True, quiet=True)

# (row of COMMANDS, argv, positional arguments, keyword arguments) the row's function must receive
CASES = [
    ("extract", ["extract", "B", "T", "-o", "out"], ("B", "T", "out"),
     dict(dtype=None, skip_missing=False, overwrite=False, max_shard_size="5GB", read=NO_PICKLE)),
    ("extract", ["extract", "B", "T", "-o", "out", "--dtype", "bfloat16", "--skip-missing", "--overwrite",
                 "--max-shard-size", "500MB", "--allow-pickle"], ("B", "T", "out"),
     dict(dtype="bfloat16", skip_missing=True, overwrite=True, max_shard_size="500MB", read=PICKLE)),
    ("extract --tau", ["extract", "B", "T", "-o", "out", "--tau", "0.5"], ("B", "T", "out"),
     dict(tau=0.5, rank=None, svd="auto", device=None, dtype=None, policy=Policy(), skip_missing=False,
          overwrite=False, calibration=None, read=NO_PICKLE)),
    ("extract --tau", ["extract", "B", "T", "-o", "out", "--rank", "4", "--svd", "exact", "--device", "cpu",
                       "--embeddings", "dense", "--lm-head", "skip", "--norms", "skip", "--biases", "skip",
                       "--dtype", "float16", "--skip-missing", "--overwrite", "--allow-pickle", "--calibration",
                       "c.jsonl"], ("B", "T", "out"),
     dict(tau=None, rank=4, svd="exact", device="cpu", dtype="float16", policy=Policy("dense", "skip", "skip", "skip"),
          skip_missing=True, overwrite=True, calibration="c.jsonl", read=PICKLE)),
    ("merge", ["merge", "B", "--add", "d1:0.5", "--add", "d2", "--add", "d3:-1", "-o", "out"], ("B", "out",
     [("d1", 0.5), ("d2", 1.0), ("d3", -1.0)]),
     dict(dtype=None, skip_missing=False, overwrite=False, max_shard_size="5GB", read=NO_PICKLE, whole_tensors=False)),
    ("merge", ["merge", "B", "--add", "d", "-o", "out", "--dtype", "float32", "--skip-missing", "--overwrite",
               "--max-shard-size", "1GB", "--allow-pickle", "--whole-tensors"], ("B", "out", [("d", 1.0)]),
     dict(dtype="float32", skip_missing=True, overwrite=True, max_shard_size="1GB", read=PICKLE, whole_tensors=True)),
    ("merge --as-lora", ["merge", "B", "--add", "l1:0.5", "--add", "l2", "-o", "out", "--as-lora"],
     ("B", "out", [("l1", 0.5), ("l2", 1.0)]),
     dict(rank=None, tau=None, svd="auto", device=None, policy=Policy(), dtype=None, calibration=None,
          skip_missing=False, overwrite=False, read=NO_PICKLE)),
    ("merge --as-lora", ["merge", "B", "--add", "l:0.5", "--add", "d:-1", "-o", "out", "--as-lora", "--rank", "8",
                         "--svd", "exact", "--device", "cpu", "--embeddings", "dense", "--lm-head", "skip", "--norms",
                         "skip", "--biases", "skip", "--dtype", "bfloat16", "--calibration", "c.txt",
                         "--skip-missing", "--overwrite", "--allow-pickle"], ("B", "out", [("l", 0.5), ("d", -1.0)]),
     dict(rank=8, tau=None, svd="exact", device="cpu", policy=Policy("dense", "skip", "skip", "skip"),
          dtype="bfloat16", calibration="c.txt", skip_missing=True, overwrite=True, read=PICKLE)),
    ("merge --as-lora", ["merge", "B", "--add", "l", "-o", "out", "--as-lora", "--tau", "0.9"],
     ("B", "out", [("l", 1.0)]),
     dict(rank=None, tau=0.9, svd="auto", device=None, policy=Policy(), dtype=None, calibration=None,
          skip_missing=False, overwrite=False, read=NO_PICKLE)),
    ("compress", ["compress", "D", "-o", "out", "--tau", "0.25"], ("D", "out"),
     dict(tau=0.25, rank=None, svd="auto", device=None, base=None, dtype=None, policy=Policy(), overwrite=False,
          calibration=None, read=NO_PICKLE)),
    ("compress", ["compress", "D", "-o", "out", "--rank", "2", "--base", "B", "--dtype", "bfloat16", "--svd",
                  "randomized", "--device", "cpu", "--embeddings", "skip", "--lm-head", "dense", "--norms", "skip",
                  "--biases", "skip", "--overwrite", "--allow-pickle", "--calibration", "c.txt"], ("D", "out"),
     dict(tau=None, rank=2, svd="randomized", device="cpu", base="B", dtype="bfloat16",
          policy=Policy("skip", "dense", "skip", "skip"), overwrite=True, calibration="c.txt", read=PICKLE)),
    ("spectrum", ["spectrum", "D", "-o", "out"], ("D", None, "out"),  # --svd auto means gram here
     dict(tau=0.5, svd="gram", device=None, policy=Policy(), layers=None, skip_missing=False, overwrite=False,
          read=NO_PICKLE)),
    ("spectrum", ["spectrum", "B", "T", "-o", "out", "--tau", "0.7", "--layers", "0,2", "--skip-missing", "--svd",
                  "exact", "--device", "cpu", "--embeddings", "dense", "--lm-head", "skip", "--norms", "skip",
                  "--biases", "skip", "--overwrite", "--allow-pickle"], ("B", "T", "out"),
     dict(tau=0.7, svd="exact", device="cpu", policy=Policy("dense", "skip", "skip", "skip"), layers=[0, 2],
          skip_missing=True, overwrite=True, read=PICKLE)),
    ("port", ["port", "P", "--to", "N", "-o", "out"], ("P", "N", "out"),
     dict(from_=None, merge=False, strict=False, overwrite=False, dtype=None, max_shard_size="5GB", read=NO_PICKLE,
          whole_tensors=False)),
    ("port", ["port", "P", "--to", "N", "--from", "OLD", "-o", "out", "--merge", "--strict", "--overwrite",
              "--dtype", "bfloat16", "--max-shard-size", "2GB", "--allow-pickle", "--whole-tensors"], ("P", "N", "out"),
     dict(from_="OLD", merge=True, strict=True, overwrite=True, dtype="bfloat16", max_shard_size="2GB", read=PICKLE,
          whole_tensors=True)),
    ("port", ["port", "P", "--to", "N", "--dry-run", "-o", "ignored"], ("P", "N", None),  # --dry-run writes nothing
     dict(from_=None, merge=False, strict=False, overwrite=False, dtype=None, max_shard_size="5GB", read=NO_PICKLE,
          whole_tensors=False)),
    ("train", ["train", "B", "--data", "a.jsonl", "-o", "out"], ("B", ["a.jsonl"], "out"),
     dict(eval_data=None, overwrite=False, settings=TrainSettings())),
    ("train", ["train", "B", "--data", "a.jsonl", "--data", "b.txt", "--eval-data", "e.jsonl", "-o", "out",
               "--overwrite"] + TRAIN_FLAGS, ("B", ["a.jsonl", "b.txt"], "out"),
     dict(eval_data=["e.jsonl"], overwrite=True, settings=TRAINED)),
    ("eval", ["eval", "M", "--questions", "q.jsonl", "-o", "out"], ("M", "q.jsonl", "out"),
     dict(adds=[], **QA_DEFAULTS)),
    ("eval", ["eval", "M", "--add", "d:0.5", "--add", "l"] + QA_FLAGS, ("M", "q.jsonl", "out"),
     dict(adds=[("d", 0.5), ("l", 1.0)], **QA_KWARGS)),
    ("sweep", ["sweep", "B", "--add", "psi", "--questions", "q.jsonl", "-o", "out"], ("B", ["psi"], "q.jsonl", "out"),
     dict(grid="0,0.25,0.5,0.75,1", val_fraction=0.0, seed=0, select="contains_em", **QA_DEFAULTS)),
    ("sweep", ["sweep", "B", "--add", "psi", "--add", "delta", "--grid", "0,1", "--val-fraction", "0.5", "--seed",
               "7", "--select", "rouge_l_recall"] + QA_FLAGS, ("B", ["psi", "delta"], "q.jsonl", "out"),
     dict(grid="0,1", val_fraction=0.5, seed=7, select="rouge_l_recall", **QA_KWARGS)),
    ("score", ["score", "P.jsonl"], ("P.jsonl", None), dict(metrics=None, overwrite=False)),
    ("score", ["score", "P.jsonl", "-o", "out", "--overwrite", "--metrics", "contains_em"], ("P.jsonl", "out"),
     dict(metrics=["contains_em"], overwrite=True)),
    ("demo", ["demo"], ("readapt-demo",), dict(quick=False, seeds=None, cache_dir=None, overwrite=False)),
    ("demo --capacity-sweep", ["demo", "--capacity-sweep", "--seeds", "2"], ("readapt-capacity",),
     dict(seeds=2, cache_dir=None, overwrite=False)),
    ("demo", ["demo", "--quick", "--seeds", "2", "-o", "out", "--cache-dir", "cache", "--overwrite"], ("out",),
     dict(quick=True, seeds=2, cache_dir="cache", overwrite=True)),
]


@pytest.fixture
def cli_env(monkeypatch):
    """main() sets HF_HUB_OFFLINE, signal handlers and warning filters for the process: undo them after."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    handlers = {sig: signal.getsignal(sig) for sig in cli._STOPS}
    with warnings.catch_warnings():
        yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def record(monkeypatch, tmp_path) -> dict[str, list]:
    """Replace every row's function by one that records its call and returns what main() can print."""
    monkeypatch.setattr(cli, "lore_summary", lambda report: "lore summary")
    monkeypatch.setattr(cli, "port_summary", lambda report: "port summary")
    monkeypatch.setattr(cli, "fold_summary", lambda report: "fold summary")
    calls: dict[str, list] = {}
    for name, command in list(cli.COMMANDS.items()):
        def fake(*args, _name=name, **kwargs):
            calls.setdefault(_name, []).append((args, kwargs))
            return tmp_path  # extract and merge return the folder they wrote
        monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(command, function=fake))
    return calls


@pytest.mark.parametrize("name, argv, args, kwargs", CASES, ids=[" ".join(c[1][:2]) + f" #{i}"
                                                               for i, c in enumerate(CASES)])
def test_flags_reach_the_function(name, argv, args, kwargs, cli_env, monkeypatch, tmp_path, capsys):
    calls = record(monkeypatch, tmp_path)
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert calls == {name: [(args, kwargs)]}  # that row's function, once, and no other


def test_extract_tau_is_extract_lowrank():
    """The dispatch is in the table: the row `extract --tau` calls extract_lowrank, `extract` calls extract;
    `merge --as-lora` calls fold, `merge` calls merge."""
    from readapt.delta import extract
    from readapt.folding import fold
    from readapt.lowrank import extract_lowrank
    from readapt.merging import merge

    assert cli.COMMANDS["extract --tau"].function is extract_lowrank
    assert cli.COMMANDS["extract"].function is extract
    assert cli.COMMANDS["merge --as-lora"].function is fold
    assert cli.COMMANDS["merge"].function is merge
    parse = cli.build_parser().parse_args
    assert cli.row(parse(["extract", "B", "T", "-o", "o", "--tau", "0.5"])) == "extract --tau"
    assert cli.row(parse(["extract", "B", "T", "-o", "o", "--rank", "3"])) == "extract --tau"
    assert cli.row(parse(["extract", "B", "T", "-o", "o"])) == "extract"
    assert cli.row(parse(["merge", "B", "--add", "l", "-o", "o", "--as-lora"])) == "merge --as-lora"
    assert cli.row(parse(["merge", "B", "--add", "l", "-o", "o"])) == "merge"


def test_allow_pickle_reaches_every_checkpoint_job():
    """Every job that reads a checkpoint takes ReadOptions from --allow-pickle (the message naming the flag
    is true for each), so eval, sweep and compress have the flag too."""
    jobs = {"eval", "sweep", "compress", "merge", "port", "extract", "spectrum"}
    assert {c[0].split()[0] for c in CASES if c[3].get("read") == PICKLE} == jobs
    assert {c[0].split()[0] for c in CASES if c[3].get("read") == NO_PICKLE} == jobs


def subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_row_and_flag_is_exercised():
    """Each row of COMMANDS has a case, and the cases use every flag of every subcommand."""
    assert {c[0] for c in CASES} == set(cli.COMMANDS)
    for command, p in subparsers().items():
        used = {word.split("=")[0] for c in CASES if c[1][0] == command for word in c[1][1:]}
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert used & set(action.option_strings), f"readapt {command}: no case uses {action.option_strings}"


@pytest.mark.parametrize("argv, message", [
    (["merge", "B", "-o", "out"], "merge needs at least one --add"),
    (["merge", "B", "-o", "out", "--as-lora"], "merge --as-lora needs at least one --add"),
    (["merge", "B", "--add", "l", "-o", "out", "--rank", "4"], "--rank applies to a merge written as one LoRA: add "
                                                               "--as-lora"),
    (["merge", "B", "--add", "l", "-o", "out", "--norms", "skip"], "--norms applies to a merge written as one LoRA"),
    (["extract", "B", "T", "-o", "out", "--calibration", "c.txt"], "--calibration measures a LoRE adapter: give "
                                                                    "--tau or --rank"),
    (["port", "P", "--to", "N"], "port needs -o OUTPUT (or --dry-run"),
    (["spectrum", "D", "-o", "out", "--layers", "0,x"], "--layers '0,x': give comma-separated layer numbers"),
])
def test_refused_before_the_call(argv, message, cli_env, monkeypatch, tmp_path, capsys):
    calls = record(monkeypatch, tmp_path)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert calls == {}


@pytest.mark.parametrize("command", [None] + list(subparsers()))
def test_help_exits_0(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: readapt" + ("" if command is None else f" {command}"))
