"""A stand-in for a web UI server in supervision tests: a real process and a real HTTP server.

It prints startup lines the way A1111 / ComfyUI do, answers ``/sdapi/v1/options``,
``/system_stats`` and ``/`` with 200 after ``--delay`` seconds, and can misbehave on demand:

    --crash-after S     exit with code 1 S seconds after becoming ready
    --fail "LINE"       print LINE (e.g. a CUDA OOM traceback line) and exit 1 before ready
    --hang              never become ready
    --child             start a grandchild (sleep) that a clean stop must also end
    --pidfile F         write "<pid> <child pid>" to F
    --counter F         append one line per start to F (counts restarts)
    --auth user:pass    require HTTP basic auth
    --print-env         print the environment it was given, one NAME=value line each
    --say "LINE"        print LINE at startup (a backend echoing what it read from its own config)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

A1111_LINES = [
    "Python 3.12.11 (main, Jun  4 2025, 08:56:18) [GCC 11.4.0]",
    "Version: v1.10.1",
    "Commit hash: 82a973c04367123ae98bd9abdf80d9eda9b910e2",
    "Launching Web UI with arguments: --port {port} --api",
    "Loading weights [6ce0161689] from /models/Stable-diffusion/v1-5-pruned-emaonly.safetensors",
]
COMFY_LINES = [
    "Total VRAM 15095 MB, total RAM 12979 MB",
    "pytorch version: 2.8.0+cu126",
    "Set vram state to: NORMAL_VRAM",
    "Adding extra search path checkpoints /links/Stable-diffusion",
]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--style", choices=("a1111", "comfyui"), default="a1111")
    p.add_argument("--delay", type=float, default=0.5)
    p.add_argument("--crash-after", type=float)
    p.add_argument("--fail")
    p.add_argument("--hang", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--pidfile")
    p.add_argument("--counter")
    p.add_argument("--auth")
    p.add_argument("--print-env", action="store_true")
    p.add_argument("--say", action="append", default=[])
    args, _ = p.parse_known_args()  # a real backend's flags (ComfyUI's --listen ...) are accepted and ignored

    if args.counter:
        with open(args.counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    child = None
    if args.child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if args.pidfile:
        with open(args.pidfile, "w") as fh:
            fh.write(f"{os.getpid()} {child.pid if child else 0}\n")

    for line in A1111_LINES if args.style == "a1111" else COMFY_LINES:
        print(line.format(port=args.port), flush=True)
    if args.print_env:
        for name, value in sorted(os.environ.items()):
            print(f"{name}={value}", flush=True)
    for line in args.say:
        print(line, flush=True)
    if args.fail:
        time.sleep(0.2)
        print("Traceback (most recent call last):", flush=True)
        print(f"  {args.fail}", flush=True)
        return 1

    ready = threading.Event()
    expected = "Basic " + base64.b64encode(args.auth.encode()).decode() if args.auth else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if not ready.is_set():
                self.send_response(503)
                self.end_headers()
                return
            if expected and self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"ok": True, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if not args.hang:
        time.sleep(args.delay)
        ready.set()
        if args.style == "a1111":
            print(f"Running on local URL:  http://127.0.0.1:{args.port}", flush=True)
            print("Model loaded in 2.1s (load weights from disk: 0.4s).", flush=True)
        else:
            print(f"To see the GUI go to: http://127.0.0.1:{args.port}", flush=True)
    if args.crash_after is not None:
        time.sleep(args.crash_after)
        print("Segmentation fault (core dumped)", flush=True)
        os._exit(1)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
