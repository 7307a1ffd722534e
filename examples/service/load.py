"""Load for the example service, from another process: a few client threads,
each with one keep-alive connection to 127.0.0.1, sending requests for
``--seconds`` (at most ``--max-requests`` in all), then stopping.

    python load.py --port PORT [--seconds 9] [--threads 4]

Prints one JSON object: ``{"records": [[start, latency, outcome], ...]}``
with ``start`` on the system-wide monotonic clock (``time.monotonic()``,
comparable across processes), ``latency`` in seconds and ``outcome`` one of
``ok``, ``wrong`` (a reply with the wrong total) and ``failed`` (an error
status, a broken or refused connection, a timeout).
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time


def expected_total(unit, qty):
    """What total_cents() should return: 10% off from ten items, rounded to
    the nearest cent (halves up)."""
    total = unit * qty
    return (total * 9 + 5) // 10 if qty >= 10 else total


def client(port, deadline, budget, seed, records):
    rng = random.Random(seed)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while time.monotonic() < deadline and budget.acquire(blocking=False):
        unit, qty = rng.randint(99, 4999), rng.randint(1, 24)
        start = time.monotonic()
        try:
            connection.request("GET", f"/total?unit={unit}&qty={qty}")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                outcome = "failed"
            else:
                right = json.loads(body)["total_cents"] == expected_total(unit, qty)
                outcome = "ok" if right else "wrong"
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            outcome = "failed"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        records.append((start, time.monotonic() - start, outcome))
    connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.seconds
    budget = threading.BoundedSemaphore(args.max_requests)
    records = []
    threads = [threading.Thread(target=client, args=(args.port, deadline, budget, i, records))
               for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    json.dump({"records": sorted(records)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
