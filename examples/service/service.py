"""The example service: a threaded HTTP server (standard library only) whose
handler computes prices with libshop's total_cents() through ctypes.

    python service.py --lib /path/libshop.so [--port 0] [--lifetime 300]

GET /total?unit=1999&qty=12 -> {"total_cents": 21589}.  It listens on
127.0.0.1 only, prints ``READY <port> <pid>`` once it serves, opens its
hotpatch control socket (``hotpatch.serve()``), and stops on SIGTERM or
after ``--lifetime`` seconds, whichever comes first.

``--workers N`` makes it a pre-forking service: the master opens the
listening socket and its control socket, then forks N workers that share
the listening socket (each gets its own control socket) and serve it.
"""
import argparse
import ctypes
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import hotpatch


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive: one connection per client thread
    disable_nagle_algorithm = True    # headers and body go out in two writes
    total_cents = None                # set by main()

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/total":
            return self._reply(404, {"error": "not found"})
        try:
            query = parse_qs(url.query)
            unit, qty = int(query["unit"][0]), int(query["qty"][0])
        except (KeyError, ValueError):
            return self._reply(400, {"error": "unit and qty are integers"})
        self._reply(200, {"total_cents": self.total_cents(unit, qty), "pid": os.getpid()})

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass      # quiet: the driver measures


def _stop_on(httpd, lifetime):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # serve_forever() runs in the main thread; shutdown() must come from another.
    threading.Thread(target=lambda: (stop.wait(lifetime), httpd.shutdown()), daemon=True).start()


def _fork_workers(count):
    """Fork the workers: their pids in the master, None in a worker."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            return None
        pids.append(pid)
    return pids


def _master(workers, lifetime):
    """Wait for the workers; SIGTERM (or the lifetime) is passed on to them."""
    def stop(*_):
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, stop)
    timer = threading.Timer(lifetime, stop)
    timer.daemon = True
    timer.start()
    for pid in workers:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)

    shop = ctypes.CDLL(args.lib)
    shop.total_cents.restype = ctypes.c_long
    shop.total_cents.argtypes = [ctypes.c_long, ctypes.c_long]
    Handler.total_cents = staticmethod(shop.total_cents)

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    hotpatch.serve()          # the control socket: `hotpatch ls <pid>` and friends
    workers = _fork_workers(args.workers) if args.workers else []
    if workers is not None:
        print(f"READY {httpd.server_address[1]} {os.getpid()}", flush=True)
    if workers:
        _master(workers, args.lifetime)
    else:
        _stop_on(httpd, args.lifetime)
        httpd.serve_forever(poll_interval=0.2)
    httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
