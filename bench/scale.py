"""Scale-out: the same N phantom studies processed by 1, 2 and 4 workers against one PostgreSQL, in one run.

Per worker count W: a fresh database on a PostgreSQL server started for the run (tests/node/postgres.py), fresh
storage, one `riha-node serve` (SCP and scheduler, no worker of its own) and W `riha-node worker` processes (each
with one model thread, `[worker] batch_size` 1 so that W studies are in work at once), dcmtk's storescp as the PACS.
Once every worker has loaded the model, all N studies are pushed over one association; the time is from the push to
the last SR arriving at the PACS. Each run then checks that every study produced exactly one SR (after a 2 s grace
period for late duplicates). The checkpoint is `tiny`, trained here on 48 other phantom studies (bench/e2e.py's).

On a machine with C cores the speed-up is bounded by C (and by what else runs there): the table prints the core
count and the load average. The quiet period (1 s) and the export are inside the measured time, as for a PACS.

    .venv/bin/python bench/scale.py                  # 12 studies, 1, 2 and 4 workers
    .venv/bin/python bench/scale.py --studies 6 --workers 1,2
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from bench.e2e import push, study_uid_of, tiny_checkpoint  # noqa: E402
from tests.node.peers import VENV_BIN, NodeProcess, StorescpProcess  # noqa: E402
from tests.node.postgres import PostgresServer  # noqa: E402

QUIET_S = 1.0
DUPLICATE_GRACE_S = 2.0
TIMEOUT_S = 1800.0


def run(workers: int, postgres: PostgresServer, checkpoint: Path, folders: list[Path], workdir: Path) -> float:
    """Seconds from the push to the last SR; raises unless every study got exactly one SR."""
    url = postgres.create_database(f"scale_{workers}_workers")
    pacs = StorescpProcess(workdir / "pacs", aet="PACS").start()
    node = NodeProcess(workdir / "node", quiet_period_s=QUIET_S, peers=[("STORESCU", "127.0.0.1")], extra_toml=(
        f'[pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\nbackoff_s = 0.5\n\n'
        f'[worker]\ndevice = "cpu"\nprocesses = 0\nbatch_size = 1\nthreads = 1\n\n'
        f'[model]\ncheckpoint = "{checkpoint}"\n'))
    os.environ["RIHA_NODE_NODE_DATABASE_URL"] = url  # serve and the workers inherit it
    logs = [workdir / f"worker{i}.log" for i in range(workers)]
    processes: list[subprocess.Popen] = []
    try:
        node.start()
        processes = [subprocess.Popen([str(VENV_BIN / "riha-node"), "worker", "--config", str(node.config_path)],
                                      stdout=log.open("ab"), stderr=subprocess.STDOUT)
                     for log in logs]
        wait(lambda: all(log.exists() and '"event": "model loaded"' in log.read_text() for log in logs),
             300, "every worker to load the model")
        started = time.monotonic()
        push(node, folders)
        wait(lambda: len(pacs.received()) >= len(folders), TIMEOUT_S, "every SR")
        elapsed = time.monotonic() - started
        time.sleep(DUPLICATE_GRACE_S)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=120)
        if node.process is not None:
            node.stop(timeout=120)
        pacs.stop()
        os.environ.pop("RIHA_NODE_NODE_DATABASE_URL", None)
    per_study = Counter(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                        for path in pacs.received())
    expected = {study_uid_of(folder) for folder in folders}
    if set(per_study) != expected or set(per_study.values()) != {1}:
        raise RuntimeError(f"{workers} workers: SRs per study {dict(per_study)}, expected exactly one for each of "
                           f"{len(expected)} studies")
    return elapsed


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=12, help="phantom studies per run (default 12)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, SRs)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.studies < 1 or not counts or min(counts) < 1:
        parser.error("--studies and every --workers count must be at least 1")

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="riha-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    postgres = PostgresServer()
    try:
        from riha_model.phantoms import write_phantoms

        load_before = os.getloadavg()
        print(f"{os.cpu_count()} CPU cores; load average at start {load_before[0]:.1f} (1 min); {args.studies} "
              f"studies per run; workers {', '.join(map(str, counts))}; PostgreSQL", flush=True)
        checkpoint = tiny_checkpoint(workdir / "checkpoint", epochs=1)
        write_phantoms(workdir / "studies", args.studies, seed=23, dicom=True, image_size=256)
        folders = sorted((workdir / "studies" / "dicom").iterdir())
        postgres.start()
        results: list[tuple[int, float]] = []
        for workers in counts:
            elapsed = run(workers, postgres, checkpoint, folders, workdir / f"workers-{workers}")
            results.append((workers, elapsed))
            print(f"  {workers} worker(s): {elapsed:.1f} s, exactly one SR for each of {args.studies} studies",
                  flush=True)
        baseline = 60.0 * args.studies / results[0][1]
        print(f"\n| workers | seconds | studies/min | speed-up vs {results[0][0]} | SRs per study |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for workers, elapsed in results:
            per_minute = 60.0 * args.studies / elapsed
            print(f"| {workers} | {elapsed:.1f} | {per_minute:.1f} | {per_minute / baseline:.2f}x | 1 |")
        print(f"\nload average (1 min) {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
              f"on {os.cpu_count()} cores")
    finally:
        postgres.stop()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
