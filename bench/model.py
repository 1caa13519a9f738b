"""RIHA at the paper preset against the reference's way of computing it (bench/reference_riha.py), side by side.

Measures, with random weights (no pretrained weights exist here) and IU-Xray shapes (2 views at 224x224, 60 tokens):
- a training step at batch 16 (forward, backward, Adam step) and the alignment's (CHA) share of it;
- generation with beam 3 up to 60 tokens for 1 study and for 16; the end token is disabled on both sides so every
  beam runs the full 60 steps (random weights would otherwise stop at arbitrary points);
- peak resident memory of a fresh process that loads the paper model and generates one report.

    .venv/bin/python bench/model.py                 # everything, 2 timed repeats after a warm-up
    .venv/bin/python bench/model.py --repeats 1 --parts train,generate
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference_riha import ReferenceRIHA  # noqa: E402
from riha_model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from riha_model.config import RihaConfig  # noqa: E402
from riha_model.model import EOS, RIHA, Batch, VisualFeatures, make_text_units  # noqa: E402
from riha_model.text import Tokenizer, clean_report  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "iu_xray" / "annotation.json"
VIEWS, TOKENS = 2, 60


def iu_tokenizer_and_reports(count: int) -> tuple[Tokenizer, list[str]]:
    train = json.loads(DATA.read_text())["train"]
    tokenizer = Tokenizer.build((entry["report"] for entry in train), threshold=3)
    return tokenizer, [clean_report(entry["report"]) for entry in train[:count]]


def iu_batch(config: RihaConfig, tokenizer: Tokenizer, reports: list[str], seed: int = 0) -> Batch:
    """Two views per study, reports padded or cut to 60 tokens."""
    generator = torch.Generator().manual_seed(seed)
    size = len(reports)
    tokens = torch.zeros(size, TOKENS, dtype=torch.long)
    token_mask = torch.zeros(size, TOKENS, dtype=torch.bool)
    for i, report in enumerate(reports):
        ids = tokenizer.encode(report, TOKENS)
        tokens[i, :len(ids)], token_mask[i, :len(ids)] = torch.tensor(ids), True
    return Batch(images=torch.randn(size, VIEWS, 3, config.image_size, config.image_size, generator=generator),
                 view_mask=torch.ones(size, VIEWS, dtype=torch.bool),
                 view_ids=torch.arange(VIEWS).expand(size, -1).clone(), tokens=tokens, token_mask=token_mask,
                 text_units=make_text_units(reports, tokenizer, config))


def build(kind: str, config: RihaConfig, vocab_size: int, seed: int = 0) -> RIHA:
    torch.manual_seed(seed)
    return RIHA(config, vocab_size) if kind == "ours" else ReferenceRIHA(config, vocab_size)


def timed(function, repeats: int, warm_up=None) -> float:
    """Median seconds of `repeats` calls after one warm-up call (of `warm_up` if given, a cheaper stand-in)."""
    (warm_up or function)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(model: RIHA, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    optimizer.step()


def alignment_pass(model: RIHA, batch: Batch, visual: VisualFeatures) -> None:
    """CHA's own work in a step: text pyramid, projections, transport, and their backward to the visual levels."""
    levels = tuple(level.detach().requires_grad_() for level in visual.levels)
    detached = VisualFeatures(tokens=visual.tokens.detach(), mask=visual.mask, levels=levels)
    model.cha(detached, model.tfp(batch.text_units))["cha_loss"].backward()


def bench_training(config: RihaConfig, repeats: int) -> dict:
    tokenizer, reports = iu_tokenizer_and_reports(16)
    batch = iu_batch(config, tokenizer, reports)
    return {kind: time_training(build(kind, config, tokenizer.vocab_size), batch, repeats, kind)
            for kind in ("reference", "ours")}


def time_training(model: RIHA, batch: Batch, repeats: int, kind: str) -> dict:
    optimizer = torch.optim.Adam([{"params": list(model.backbone_parameters()), "lr": 5e-5},
                                  {"params": list(model.head_parameters()), "lr": 1e-4}],
                                 weight_decay=5e-5, amsgrad=True)
    step = timed(lambda: training_step(model, optimizer, batch), repeats)
    with torch.no_grad():
        model.train()
        visual = model.vfp(batch.images, batch.view_mask, batch.view_ids)
    alignment = timed(lambda: alignment_pass(model, batch, visual), repeats)
    print(f"  {kind:9s} training step {step:6.2f} s   CHA {alignment:5.2f} s ({100 * alignment / step:4.1f}%)",
          flush=True)
    return {"step_s": step, "cha_s": alignment}


def bench_generation(config: RihaConfig, repeats: int) -> dict:
    tokenizer, _ = iu_tokenizer_and_reports(0)
    results = {}
    for kind in ("reference", "ours"):
        model = build(kind, config, tokenizer.vocab_size).eval()
        with torch.no_grad():
            model.logit.bias[EOS] = float("-inf")  # every beam runs the full length on both sides
        for studies in (1, 16):
            results[f"{kind}_{studies}"] = time_generation(model, iu_batch(config, tokenizer, ["x"] * studies,
                                                                           seed=studies), repeats, kind)
    return results


def time_generation(model: RIHA, batch: Batch, repeats: int, kind: str) -> float:
    lengths = []

    def run(max_len: int = TOKENS):
        lengths[:] = [len(ids) for ids in model.generate(batch.images, batch.view_mask, batch.view_ids,
                                                         beam_size=3, max_len=max_len)]
    seconds = timed(run, repeats, warm_up=lambda: run(max_len=3))
    studies = len(lengths)
    assert lengths == [TOKENS] * studies, lengths
    print(f"  {kind:9s} generation, {studies:2d} stud{'y' if studies == 1 else 'ies'}: {seconds:6.2f} s", flush=True)
    return seconds


def memory_child(kind: str, path: str, preset: str) -> None:
    """In a fresh process: load the paper model, generate one report, print the peak resident set in MiB."""
    torch.set_num_threads(2)
    if kind == "ours":
        model = load_checkpoint(path).model
    elif kind == "reference":
        model = ReferenceRIHA(RihaConfig.preset(preset), int(Path(path).with_suffix(".vocab").read_text()))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    if kind != "baseline":
        batch = iu_batch(model.config, Tokenizer(["<unk>"]), ["x"], seed=1)
        model.generate(batch.images, batch.view_mask, batch.view_ids, beam_size=3, max_len=TOKENS)
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_memory(config: RihaConfig, preset: str) -> dict:
    tokenizer, _ = iu_tokenizer_and_reports(0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        ours = Path(folder) / "paper.safetensors"
        save_checkpoint(ours, build("ours", config, tokenizer.vocab_size), config, tokenizer.to_dict())
        reference = Path(folder) / "reference.pt"
        torch.save(build("reference", config, tokenizer.vocab_size).state_dict(), reference)
        reference.with_suffix(".vocab").write_text(str(tokenizer.vocab_size))
        for kind, path in (("baseline", ""), ("reference", reference), ("ours", ours)):
            output = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(path), "--preset", preset],
                                    check=True,
                                    capture_output=True, text=True).stdout
            results[kind] = float(output.split()[-1])
            print(f"  {kind:9s} peak RSS {results[kind]:7.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (median reported)")
    parser.add_argument("--parts", default="train,generate,memory", help="comma list of train, generate, memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="paper", help="model preset (tiny: a quick check of the script)")
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.preset)
        return
    torch.set_num_threads(args.threads)
    config = RihaConfig.preset(args.preset)
    parts = args.parts.split(",")
    print(f"{args.preset} preset, random weights, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.repeats} after a warm-up")
    if "train" in parts:
        print("training step, batch 16, 2 views, 60 tokens:")
        train = bench_training(config, args.repeats)
    if "generate" in parts:
        print("generation, beam 3, 60 tokens (end token disabled on both sides):")
        generation = bench_generation(config, args.repeats)
    if "memory" in parts:
        print("load the checkpoint and generate one report, fresh process:")
        memory = bench_memory(config, args.preset)
    print("\n| measure | reference | ours | ratio |\n| --- | --- | --- | --- |")
    if "train" in parts:
        ref, ours = train["reference"], train["ours"]
        print(f"| training step, batch 16 | {ref['step_s']:.2f} s | {ours['step_s']:.2f} s | "
              f"{ref['step_s'] / ours['step_s']:.2f}x faster |")
        print(f"| CHA share of the step | {100 * ref['cha_s'] / ref['step_s']:.1f}% ({ref['cha_s']:.2f} s) | "
              f"{100 * ours['cha_s'] / ours['step_s']:.1f}% ({ours['cha_s']:.2f} s) | "
              f"{ref['cha_s'] / ours['cha_s']:.1f}x faster |")
    if "generate" in parts:
        for studies in (1, 16):
            ref, ours = generation[f"reference_{studies}"], generation[f"ours_{studies}"]
            print(f"| generation, {studies} stud{'y' if studies == 1 else 'ies'} | {ref:.2f} s | {ours:.2f} s | "
                  f"{ref / ours:.2f}x faster |")
    if "memory" in parts:
        print(f"| peak RSS, load + one report (bare python + torch: {memory['baseline']:.0f} MiB) | "
              f"{memory['reference']:.0f} MiB | {memory['ours']:.0f} MiB | "
              f"{memory['reference'] / memory['ours']:.2f}x less |")


if __name__ == "__main__":
    main()
