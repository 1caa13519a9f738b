"""End to end: phantom studies pushed by storescu to `riha-node serve`, drafted, and the SR accepted by a PACS.

One run per preset (`tiny`, `paper`), each with a fresh node (SQLite, storage in a temporary folder), one worker
process on the CPU (`[worker] batch_size` 4, the default) and dcmtk's storescp as the PACS the SRs go to. dcmtk's
storescu sends the studies with TCP_NODELAY=1 (dcmtk leaves Nagle on otherwise). The quiet period is 2 s
(`--quiet`). Studies are phantom CR studies (riha_model.phantoms, 256 x 256, frontal and lateral: two instances).

Checkpoints, built in the same run:
- tiny: trained on 48 other phantom studies (2 epochs, 1 with --quick); a real model that writes short reports.
- paper: the paper preset with RANDOM weights (no pretrained weights exist here) and the IU-Xray vocabulary: its
  drafts run to the full 60 tokens, the slowest case for generation.

Each preset runs once per `--threads` setting: "default" leaves torch its default (one intra-op thread per core),
a number N starts the node with OMP_NUM_THREADS=N, which its worker processes inherit. On a machine whose cores are
shared with other busy processes, torch's threads wait on each other between the many small operations of beam
search, and one thread can be many times faster than two; the run measures both.

Per preset and thread setting, after one warm-up study (not counted):
- one at a time: each study is pushed (one association, both instances) and the next one only after its SR was
  accepted; this is the latency an operator sees. Goal: SR accepted within quiet period + 3 s, `paper` preset.
- burst: all studies pushed at once over one association, then the run waits for every SR; throughput, with
  batching (one forward pass for up to 4 studies).

Latency of a study: from the node's "instance stored" log time of its last instance to its "draft delivered" log
time (both from the node's JSON log, one clock), split into:
- quiet: the configured quiet period;
- queue wait: after the quiet period until a worker claims the study ("study claimed"); it holds the scheduler's
  closing tick, the worker's poll and, in a burst, the studies ahead;
- decode, model, SR: the worker's logged timings; model is the whole forward pass of the study's batch (the log gives
  that time divided by the batch size);
- other: the rest of the worker's time for the study: database commits, and in a batch the decode and SR of the
  other studies of the batch;
- export: "study reported" to "draft delivered": the exporter's poll (every 1 s) and the C-STORE.
Median and p95 (linear interpolation; with few studies p95 is near the maximum) per column; studies per minute is the
scenario's study count over the time from its first instance stored to its last SR accepted.

    .venv/bin/python bench/e2e.py                           # 8 studies per scenario, tiny and paper, threads default,1
    .venv/bin/python bench/e2e.py --quick                   # 3 studies, tiny trained 1 epoch
    .venv/bin/python bench/e2e.py --studies 4 --presets paper --threads 1 --keep /tmp/e2e
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from tests.node.peers import NodeProcess, StorescpProcess, dcmtk, dcmtk_env  # noqa: E402

IU_XRAY = ROOT.parent / "shared" / "data" / "iu_xray" / "annotation.json"
PRESETS = ("tiny", "paper")
GOAL_MARGIN_S = 3.0
BATCH_SIZE = 4
STAGES = ("quiet", "queue wait", "decode", "model", "SR", "other", "export", "total")


# ------------------------------------------------------------------------------------------------- checkpoints

def tiny_checkpoint(folder: Path, epochs: int) -> Path:
    from riha_model.api import train_model
    from riha_model.phantoms import write_phantoms

    annotation = write_phantoms(folder / "train-phantoms", 48, seed=7, image_size=128)
    path = folder / "tiny.ckpt"
    train_model(annotation, path, preset="tiny", epochs=epochs, batch_size=8, seed=7, device="cpu")
    return path


def paper_checkpoint(folder: Path) -> Path:
    """The paper preset with random weights: generation time is what is measured, not what it writes."""
    import torch

    from riha_model.checkpoint import save_checkpoint
    from riha_model.config import RihaConfig
    from riha_model.model import RIHA
    from riha_model.text import Tokenizer

    train = json.loads(IU_XRAY.read_text())["train"]
    tokenizer = Tokenizer.build((entry["report"] for entry in train), threshold=3)
    config = RihaConfig.preset("paper")
    torch.manual_seed(0)
    model = RIHA(config, tokenizer.vocab_size, pretrained=False)
    path = folder / "paper-random.ckpt"
    save_checkpoint(path, model, config, tokenizer.to_dict(), metadata={"preset": "paper", "weights": "random"})
    return path


# ------------------------------------------------------------------------------------------------- the node's log

class LogTail:
    """The node's JSON log lines (the node and its worker write to one file), read as they come."""

    def __init__(self, path: Path):
        self.path, self.offset, self.events = path, 0, []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return self.events

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self.poll())
            if found:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.path}")


def delivered(events: list[dict], study_uids: set[str]) -> bool:
    done = {e.get("study_uid") for e in events if e.get("event") == "draft delivered"}
    problems = [e for e in events if e.get("event") in ("study failed", "export failed", "study retried")
                and e.get("study_uid", "") in study_uids | {""}]
    if problems:
        raise RuntimeError(f"the node reported a problem: {problems[0]}")
    return study_uids <= done


def timestamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@dataclass
class StudyLatency:
    study_uid: str
    first_stored: float
    stages: dict[str, float]
    batch: int
    close_lag: float  # quiet period end to "study queued": the scheduler's tick
    delivered_at: float


def latencies(events: list[dict], study_uids: list[str], quiet: float) -> list[StudyLatency]:
    stored: dict[str, list[float]] = {}
    first: dict[str, dict] = {}
    batch_of: dict[str, int] = {}
    current: dict[str, list[str]] = {}  # worker -> studies claimed in its open batch
    reported_since: dict[str, bool] = {}
    for event in events:  # one worker's lines are in its own order; a batch is a run of claims before reports
        kind, uid = event.get("event"), event.get("study_uid")
        if kind == "instance stored":
            stored.setdefault(uid, []).append(timestamp(event))
        elif kind == "study claimed":
            worker = event["worker"]
            if reported_since.get(worker, True):
                current[worker], reported_since[worker] = [], False
            current[worker].append(uid)
            for member in current[worker]:
                batch_of[member] = len(current[worker])
        elif kind == "study reported":
            reported_since[event["worker"]] = True
        if kind in ("study queued", "study claimed", "study reported", "draft delivered"):
            first.setdefault(f"{kind}|{uid}", event)  # the first of each (no study is retried in a clean run)
    out = []
    for uid in study_uids:
        last = max(stored[uid])
        queued, claimed, reported, done = (first[f"{kind}|{uid}"] for kind in
                                           ("study queued", "study claimed", "study reported", "draft delivered"))
        t_claimed, t_reported, t_done = timestamp(claimed), timestamp(reported), timestamp(done)
        batch = batch_of[uid]
        decode, model, sr = reported["decode_s"], reported["model_s"] * batch, reported["sr_s"]
        stages = {"quiet": quiet, "queue wait": t_claimed - last - quiet, "decode": decode, "model": model,
                  "SR": sr, "other": (t_reported - t_claimed) - decode - model - sr, "export": t_done - t_reported,
                  "total": t_done - last}
        out.append(StudyLatency(uid, min(stored[uid]), stages, batch, timestamp(queued) - last - quiet, t_done))
    return out


# ------------------------------------------------------------------------------------------------- one run

@dataclass
class Scenario:
    preset: str
    threads: str
    name: str
    studies: list[StudyLatency]
    words: list[int] = field(default_factory=list)

    @property
    def per_minute(self) -> float:
        span = max(s.delivered_at for s in self.studies) - min(s.first_stored for s in self.studies)
        return 60.0 * len(self.studies) / span


def study_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def push(node: NodeProcess, folders: list[Path]) -> None:
    files = [str(path) for folder in folders for path in sorted(folder.glob("*.dcm"))]
    result = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
                             str(node.port), *files], capture_output=True, text=True, env=dcmtk_env())
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")


def text_words(dataset: pydicom.Dataset) -> int:
    words = 0
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            words += len(str(item.TextValue).split())
        words += text_words(item)
    return words


def run_preset(preset: str, threads: str, checkpoint: Path, study_folders: list[Path], count: int, quiet: float,
               workdir: Path) -> list[Scenario]:
    pacs = StorescpProcess(workdir / "pacs", aet="PACS").start()
    node = NodeProcess(workdir / "node", quiet_period_s=quiet, peers=[("STORESCU", "127.0.0.1")],
                       extra_toml=(f'[pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                                   f'backoff_s = 0.5\nbackoff_max_s = 2\nmax_attempts = 30\n\n'
                                   f'[worker]\ndevice = "cpu"\nprocesses = 1\nbatch_size = {BATCH_SIZE}\n\n'
                                   f'[model]\ncheckpoint = "{checkpoint}"\n'))
    log = LogTail(node.log_path)
    per_study_timeout = 600.0
    label = f"{preset}, threads {threads}"
    saved = os.environ.get("OMP_NUM_THREADS")
    try:
        if threads == "default":
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads  # the node and its workers inherit it
        try:
            node.start()
        finally:
            os.environ.pop("OMP_NUM_THREADS", None)
            if saved is not None:
                os.environ["OMP_NUM_THREADS"] = saved
        log.wait_for(lambda events: any(e.get("event") == "model loaded" for e in events), 300, "the model to load")
        warm_up, sequential, burst = study_folders[0], study_folders[1:1 + count], study_folders[1 + count:]
        push(node, [warm_up])
        log.wait_for(lambda events: delivered(events, {study_uid_of(warm_up)}), per_study_timeout, "the warm-up SR")
        print(f"  {label}: warm-up study delivered; one at a time ...", flush=True)
        for folder in sequential:
            push(node, [folder])
            log.wait_for(lambda events: delivered(events, {study_uid_of(folder)}), per_study_timeout,
                         f"the SR of {folder.name}")
        print(f"  {label}: burst of {len(burst)} ...", flush=True)
        push(node, burst)
        burst_uids = {study_uid_of(folder) for folder in burst}
        log.wait_for(lambda events: delivered(events, burst_uids), per_study_timeout * len(burst), "the burst's SRs")
    finally:
        if node.process is not None:
            node.stop(timeout=120)
        pacs.stop()
    events = log.poll()
    received = pacs.received()
    expected = 1 + 2 * count
    if len(received) != expected:
        raise RuntimeError(f"the PACS received {len(received)} SRs, expected {expected}")
    words = {str(ds.StudyInstanceUID): text_words(ds) for ds in (pydicom.dcmread(p) for p in received)}
    out = []
    for name, folders in (("one at a time", sequential), (f"burst of {count}", burst)):
        uids = [study_uid_of(folder) for folder in folders]
        out.append(Scenario(preset, threads, name, latencies(events, uids, quiet), [words[uid] for uid in uids]))
    return out


# ------------------------------------------------------------------------------------------------- report

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def seconds(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}"  # no "-0.00" for a rounding residue of a few milliseconds


def print_table(scenarios: list[Scenario], quiet: float) -> None:
    goal = quiet + GOAL_MARGIN_S
    print()
    print("Latency from the last instance stored to the SR accepted by PACS, seconds (median / p95):")
    print()
    print("| preset | threads | scenario | " + " | ".join(STAGES) + f" | within {goal:g} s | studies/min |")
    print("|---|---|---|" + "---:|" * (len(STAGES) + 2))
    for scenario in scenarios:
        cells = []
        for stage in STAGES:
            values = [s.stages[stage] for s in scenario.studies]
            cells.append(f"{seconds(statistics.median(values))} / {seconds(percentile(values, 95))}"
                         if stage != "quiet" else f"{quiet:g}")
        within = sum(s.stages["total"] <= goal for s in scenario.studies)
        print(f"| {scenario.preset} | {scenario.threads} | {scenario.name} | " + " | ".join(cells)
              + f" | {within}/{len(scenario.studies)} | {scenario.per_minute:.1f} |")
    print()
    print("| preset | threads | scenario | batch sizes | scheduler tick in queue wait (median) "
          "| words per draft (median) |")
    print("|---|---|---|---|---:|---:|")
    for scenario in scenarios:
        batches = sorted({s.batch for s in scenario.studies})
        print(f"| {scenario.preset} | {scenario.threads} | {scenario.name} | {', '.join(map(str, batches))} | "
              f"{statistics.median(s.close_lag for s in scenario.studies):.2f} | "
              f"{statistics.median(scenario.words):.0f} |")


def verdict(scenarios: list[Scenario], quiet: float) -> None:
    goal = quiet + GOAL_MARGIN_S
    for scenario in scenarios:
        if scenario.preset != "paper" or scenario.name != "one at a time":
            continue
        median = {stage: statistics.median(s.stages[stage] for s in scenario.studies) for stage in STAGES}
        after_quiet = median["total"] - quiet
        worst = max((stage for stage in STAGES if stage not in ("quiet", "total")), key=median.get)
        within = sum(s.stages["total"] <= goal for s in scenario.studies)
        print()
        print(f"Goal (paper, threads {scenario.threads}, one at a time: SR accepted within the quiet period + "
              f"{GOAL_MARGIN_S:g} s = {goal:g} s): {'met' if within == len(scenario.studies) else 'missed'} "
              f"({within}/{len(scenario.studies)} studies); median {median['total']:.2f} s, {after_quiet:.2f} s after "
              f"the quiet period, of which {worst} {median[worst]:.2f} s ({100 * median[worst] / after_quiet:.0f}%).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=None, help="studies per scenario (default 8, --quick 3)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated: tiny,paper")
    parser.add_argument("--quiet", type=float, default=2.0, help="[study] quiet_period_s of the node (default 2)")
    parser.add_argument("--threads", default="default,1",
                        help="comma-separated torch thread settings for the node: default (one per core) or a number")
    parser.add_argument("--quick", action="store_true", help="3 studies, tiny trained for 1 epoch")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, SRs)")
    args = parser.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if unknown := sorted(set(presets) - set(PRESETS)):
        parser.error(f"unknown preset(s) {', '.join(unknown)}; use {', '.join(PRESETS)}")
    thread_settings = [t.strip() for t in args.threads.split(",") if t.strip()]
    if bad := [t for t in thread_settings if t != "default" and not (t.isdigit() and int(t) > 0)]:
        parser.error(f"--threads takes 'default' or positive numbers, not {', '.join(bad)}")
    count = args.studies or (3 if args.quick else 8)
    if count < 1:
        parser.error("--studies must be at least 1")

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="riha-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        from riha_model.phantoms import write_phantoms
        import torch

        print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}; "
              f"load average at start {load_before[0]:.1f} (1 min); {count} studies per scenario; quiet period "
              f"{args.quiet:g} s; one worker process, batch size {BATCH_SIZE}; node threads: "
              f"{', '.join(thread_settings)}", flush=True)
        write_phantoms(workdir / "studies", max(3, 1 + 2 * count), seed=11, dicom=True, image_size=256)
        folders = sorted((workdir / "studies" / "dicom").iterdir())[:1 + 2 * count]
        scenarios: list[Scenario] = []
        for preset in presets:
            building = time.monotonic()
            if preset == "tiny":
                checkpoint = tiny_checkpoint(workdir / "checkpoints", epochs=1 if args.quick else 2)
                how = "trained on 48 phantom studies"
            else:
                checkpoint = paper_checkpoint(workdir / "checkpoints")
                how = "RANDOM weights, IU-Xray vocabulary: full-length drafts, the slowest case"
            print(f"  {preset}: checkpoint ({how}) ready in {time.monotonic() - building:.0f} s", flush=True)
            for threads in thread_settings:
                scenarios += run_preset(preset, threads, checkpoint, folders, count, args.quiet,
                                        workdir / f"{preset}-threads-{threads}")
        load_after = os.getloadavg()
        print_table(scenarios, args.quiet)
        verdict(scenarios, args.quiet)
        print()
        print(f"Whole run {time.monotonic() - started:.0f} s; load average (1 min) {load_before[0]:.1f} at start, "
              f"{load_after[0]:.1f} at end, on {os.cpu_count()} cores.")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
