"""DICOM ingest over loopback: riha-node serve against dcmtk storescp, same files, same sender, same run.

Two sets of real chest radiographs are derived once into a temporary folder, each instance with its own SOP Instance
UID, spread over a few studies: large files (RG1_UNCR.dcm from pydicom-data, 7.2 MB CR, explicit VR little endian)
and small files (the SIIM pneumothorax CR as JPEG baseline secondary capture, 127 KB). dcmtk's storescu sends them,
with TCP_NODELAY=1 in its environment (dcmtk leaves Nagle on otherwise), over one association or over four at once
(four storescu processes, each sending a quarter of the files). The time is from starting the senders to the last
one finishing; every file must then be present at the target, or the run stops with an error.

Targets, each started fresh (empty folder, new database) for every measurement so that nothing is a duplicate:
- storescp: dcmtk storescp --fork +B, writing each file as received; it never fsyncs.
- storescp+sync: the same, running `sync FILE FOLDER` (coreutils: fsync of the file and of its folder) in the
  foreground after each C-STORE. storescp runs it after sending the response, so the sender's next request
  overlaps it a little; dcmtk 3.6.7 has no fsync option of its own.
- riha-node: `riha-node serve` with its durability always on (temp file, fsync, rename, folder fsync, SQLite commit
  with synchronous=FULL, then the answer), logging each instance as usual; quiet period one hour, so that no study
  closes while measured.

Dirty pages left by one measurement are flushed (sync) before the next one starts. Ratios are node / storescp
(plain) measured in the same run; with --repeat the median time of the repeats is shown.

    .venv/bin/python bench/ingest.py                 # 100 large + 1000 small, 1 and 4 associations
    .venv/bin/python bench/ingest.py --quick         # 10 large + 100 small
    .venv/bin/python bench/ingest.py --large 40 --small 400 --repeat 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid  # noqa: E402

from tests.node.peers import NodeProcess, StorescpProcess, dcmtk, dcmtk_env, wait_for_port  # noqa: E402
from tests.node.samples import SHARED_SC_JPEG, derive, real_file  # noqa: E402

LARGE_SOURCE = "RG1_UNCR.dcm"
STUDIES_PER_SET = 5
TARGETS = ("storescp", "storescp+sync", "riha-node")
GOAL_LARGE_RATIO = 0.8
GOAL_SMALL_RATE = 50.0


@dataclass
class FileSet:
    name: str
    files: list[Path]
    storescu_options: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


@dataclass
class Measurement:
    file_set: str
    files: int
    megabytes: float
    associations: int
    target: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.median_s

    @property
    def instances_per_s(self) -> float:
        return self.files / self.median_s


class BenchStorescp(StorescpProcess):
    """storescp forking a child per association (as a real receiver would), optionally syncing each file."""

    def __init__(self, output_dir: Path, sync_each_file: bool):
        super().__init__(output_dir)
        self.sync_each_file = sync_each_file

    def start(self) -> "BenchStorescp":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        options = ["--fork", "+B", "+xa", "-aet", self.aet, "-od", str(self.output_dir)]
        if self.sync_each_file:
            options += ["-xcr", "sync #p/#f #p", "-xs"]
        self.process = subprocess.Popen([dcmtk("storescp"), *options, str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=dcmtk_env())
        wait_for_port(self.port, process=self.process)
        return self

    def received(self) -> list[Path]:
        return [path for path in self.output_dir.rglob("*") if path.is_file()]


def make_sets(workdir: Path, large: int, small: int) -> list[FileSet]:
    sets = []
    for name, count, source, options in (("large", large, real_file(LARGE_SOURCE), ()),
                                         ("small", small, SHARED_SC_JPEG, ("-xy",))):
        if count <= 0:
            continue
        assert source.exists(), f"{source} is missing"
        studies = [generate_uid() for _ in range(min(STUDIES_PER_SET, count))]
        files = [derive(source, workdir / name / f"{name}{i:05d}.dcm", study_uid=studies[i * len(studies) // count])
                 for i in range(count)]
        sets.append(FileSet(name, files, options))
    return sets


def send(file_set: FileSet, associations: int, port: int, called_ae: str) -> float:
    """Start the storescu processes together; seconds until the last one exits. Any failure stops the run."""
    shares = [file_set.files[i::associations] for i in range(associations)]
    command = [dcmtk("storescu"), *file_set.storescu_options, "-aet", "STORESCU", "-aec", called_ae, "127.0.0.1",
               str(port)]
    env = dcmtk_env()
    start = time.perf_counter()
    senders = [subprocess.Popen(command + [str(p) for p in share], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env) for share in shares if share]
    outputs = [sender.communicate(timeout=1800)[0] for sender in senders]
    elapsed = time.perf_counter() - start
    for sender, output in zip(senders, outputs):
        if sender.returncode != 0 or b"E: " in output:
            raise SystemExit(f"storescu failed (exit {sender.returncode}):\n{output.decode(errors='replace')[-3000:]}")
    return elapsed


def measure_storescp(file_set: FileSet, associations: int, workdir: Path, sync_each_file: bool) -> float:
    target = BenchStorescp(workdir / "storescp", sync_each_file).start()
    try:
        seconds = send(file_set, associations, target.port, target.aet)
        received = len(target.received())
    finally:
        target.stop()
    if received != len(file_set.files):
        raise SystemExit(f"storescp received {received} of {len(file_set.files)} {file_set.name} files")
    return seconds


def measure_node(file_set: FileSet, associations: int, workdir: Path) -> float:
    node = NodeProcess(workdir / "node", quiet_period_s=3600, peers=[("STORESCU", "127.0.0.1")]).start()
    try:
        seconds = send(file_set, associations, node.port, node.ae_title)
        instances = node.status()["instances"]
    finally:
        code = node.stop()
    on_disk = len(list((node.storage_dir / "studies").rglob("*.dcm")))
    if instances != len(file_set.files) or on_disk != len(file_set.files):
        raise SystemExit(f"riha-node recorded {instances} and wrote {on_disk} of {len(file_set.files)} "
                         f"{file_set.name} files; log:\n{node.log_text()[-3000:]}")
    if code != 0:
        raise SystemExit(f"riha-node serve exited with {code}; log:\n{node.log_text()[-3000:]}")
    return seconds


def measure(target: str, file_set: FileSet, associations: int, workdir: Path) -> float:
    run_dir = workdir / "target"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    os.sync()  # the previous measurement's dirty pages are written back now, not during this one
    try:
        if target == "riha-node":
            return measure_node(file_set, associations, run_dir)
        return measure_storescp(file_set, associations, run_dir, sync_each_file=target == "storescp+sync")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def print_table(results: list[Measurement], repeat: int) -> None:
    baseline = {(m.file_set, m.associations): m for m in results if m.target == "storescp"}
    if repeat > 1:
        print(f"seconds: median of {repeat} measurements; MB/s and instances/s from that median")
    print("| set   | files |     MB | assoc | target        |  seconds | (min-max)   |   MB/s | inst/s | vs storescp |")
    print("|-------|------:|-------:|------:|---------------|---------:|-------------|-------:|-------:|------------:|")
    for m in results:
        ratio = baseline[(m.file_set, m.associations)].median_s / m.median_s
        print(f"| {m.file_set:5} | {m.files:5d} | {m.megabytes:6.0f} | {m.associations:5d} | {m.target:13} | "
              f"{m.median_s:8.2f} | {min(m.seconds):5.2f}-{max(m.seconds):<5.2f} | {m.mb_per_s:6.0f} | "
              f"{m.instances_per_s:6.1f} | {ratio:10.2f}x |")


def check_goals(results: list[Measurement]) -> list[str]:
    by_key = {(m.file_set, m.associations, m.target): m for m in results}
    lines = []
    for (set_name, associations, target), m in sorted(by_key.items()):
        if target != "riha-node":
            continue
        if set_name == "large":
            ratio = by_key[(set_name, associations, "storescp")].median_s / m.median_s
            met = "met" if ratio >= GOAL_LARGE_RATIO else "NOT MET"
            lines.append(f"large, {associations} assoc: node/storescp {ratio:.2f}x (goal >= {GOAL_LARGE_RATIO}x): {met}")
        elif set_name == "small" and associations == 4:
            met = "met" if m.instances_per_s >= GOAL_SMALL_RATE else "NOT MET"
            lines.append(f"small, 4 assoc: node {m.instances_per_s:.0f} instances/s "
                         f"(goal >= {GOAL_SMALL_RATE:.0f}): {met}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100, help="large files (7.2 MB CR) to send (default 100)")
    parser.add_argument("--small", type=int, default=1000, help="small files (127 KB JPEG CR) to send (default 1000)")
    parser.add_argument("--repeat", type=int, default=1, help="measurements per row; the median is shown")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 large, 100 small")
    parser.add_argument("--workdir", type=Path, default=None, help="where files and targets go (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.large, args.small = 10, 100
    associations = [int(a) for a in args.associations.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if "riha-node" in targets and "storescp" not in targets:
        targets.insert(0, "storescp")  # the ratio needs its baseline

    version = subprocess.run([dcmtk("storescp"), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start; "
          f"{version.strip()}")
    workdir = Path(tempfile.mkdtemp(prefix="riha-ingest-bench-", dir=args.workdir))
    try:
        started = time.perf_counter()
        sets = make_sets(workdir, args.large, args.small)
        print(f"derived {', '.join(f'{len(s.files)} {s.name} ({s.total_bytes / 1e6:.0f} MB)' for s in sets)} "
              f"in {time.perf_counter() - started:.0f} s under {workdir}")
        results = []
        for file_set in sets:
            megabytes = file_set.total_bytes / 1e6
            for count in associations:
                rows = [Measurement(file_set.name, len(file_set.files), megabytes, count, t) for t in targets]
                for _ in range(args.repeat):  # targets alternate within a repeat, so drift hits them alike
                    for row in rows:
                        row.seconds.append(measure(row.target, file_set, count, workdir))
                        print(f"  {file_set.name} x{len(file_set.files)}, {count} assoc, {row.target}: "
                              f"{row.seconds[-1]:.2f} s", file=sys.stderr, flush=True)
                results.extend(rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(results, args.repeat)
    print()
    for line in check_goals(results):
        print(line)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")


if __name__ == "__main__":
    main()
