"""SIGTERM stops a process whose main thread waits while other threads block, every time.

With a plain `signal.signal(..., lambda *_: event.set())` and `event.wait()`, such a process ignored SIGTERM in
about one run in eight here (the kernel delivered the signal to another thread), which is how `serve` once hung.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import queue, selectors, socket, threading
from riha_node.stopping import StopSignal

def blocked_in_queue():
    queue.Queue().get()

def polling_a_socket():
    selector = selectors.DefaultSelector()
    selector.register(socket.socket(), selectors.EVENT_READ)
    while True:
        selector.select(0.5)

for target in [blocked_in_queue] * 4 + [polling_a_socket] * 4:
    threading.Thread(target=target, daemon=True).start()
stop = StopSignal()
print("ready", flush=True)
stop.wait()
print(stop.name, flush=True)
"""


def test_sigterm_stops_a_busy_process_every_time():
    for _ in range(30):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        try:
            assert child.stdout.readline() == "ready\n"
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=5) == 0
            assert child.stdout.read() == "SIGTERM\n"
        finally:
            child.kill()
            child.stdout.close()
            child.wait()
