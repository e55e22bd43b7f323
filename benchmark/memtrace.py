"""Where a script's memory grows: runs SCRIPT as __main__ and, every 20 ms, prints the main thread's innermost
frames to stderr whenever the resident set grew by more than 8 MiB since the last print (docs/benchmark.md).

    python benchmark/memtrace.py ppo.py --model-name ... 2> trace.txt
"""

import os
import runpy
import sys
import threading
import time
import traceback


def rss_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def watch(main):
    last = rss_mib()
    while True:
        time.sleep(0.02)
        now = rss_mib()
        if now > last + 8:
            frames = traceback.extract_stack(sys._current_frames()[main])[::-1][:6]
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
            print(f"MEM {last} -> {now} MiB at {where}", file=sys.stderr, flush=True)
            last = now


if __name__ == "__main__":
    threading.Thread(target=watch, args=(threading.main_thread().ident,), daemon=True).start()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
