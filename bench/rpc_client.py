"""oslo.messaging RPC client for bench/rpc-roundtrip.ts: sequential `call`s of the no-op `ping`
on <topic>.<server>; a warm-up, then a fixed time window (capped at --max-calls).

Prints one JSON line: {"calls": n, "seconds": s, "calls_per_s": r}.
Usage: rpc_client.py --url rabbit://... --topic T --server S [--warmup 2 --seconds 5 --max-calls 100000]
"""
import argparse
import json
import os
import time

from oslo_config import cfg
import oslo_messaging as om
from oslo_messaging._metrics import client as metrics_client


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--url', required=True)
    ap.add_argument('--topic', required=True)
    ap.add_argument('--server', required=True)
    ap.add_argument('--exchange', default='nova')
    ap.add_argument('--warmup', type=float, default=2.0)
    ap.add_argument('--seconds', type=float, default=5.0)
    ap.add_argument('--max-calls', type=int, default=100000)
    ap.add_argument('--timeout', type=float, default=10.0)
    args = ap.parse_args()

    conf = cfg.ConfigOpts()
    conf([])
    # RPCClient.call reads [oslo_messaging_metrics]; only a full service registers it.
    conf.register_opts(metrics_client.oslo_messaging_metrics, group='oslo_messaging_metrics')
    om.set_transport_defaults(args.exchange)
    transport = om.get_rpc_transport(conf, url=args.url)
    client = om.get_rpc_client(transport, om.Target(topic=args.topic, server=args.server, version='6.0'),
                               timeout=args.timeout)
    ctxt = {'request_id': 'req-bench', 'user_id': 'bench', 'project_id': 'bench'}
    try:
        end = time.monotonic() + args.warmup
        while time.monotonic() < end:
            client.call(ctxt, 'ping')

        calls = 0
        start = time.monotonic()
        end = start + args.seconds
        while calls < args.max_calls:
            client.call(ctxt, 'ping')
            calls += 1
            if time.monotonic() >= end:
                break
        elapsed = time.monotonic() - start
    finally:
        transport.cleanup()
    print(json.dumps({'calls': calls, 'seconds': elapsed, 'calls_per_s': calls / elapsed}), flush=True)
    # Interpreter shutdown waits ~9 s on oslo's reply-listener thread after cleanup(); nothing is left to flush.
    os._exit(0)


if __name__ == '__main__':
    main()
