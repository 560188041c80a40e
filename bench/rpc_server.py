"""oslo.messaging RPC server for bench/rpc-roundtrip.ts: serves a no-op `ping` on <topic>.<server>.

Prints READY once consuming; stops cleanly on SIGTERM or when stdin closes (so it never outlives
the benchmark). Usage: rpc_server.py --url rabbit://... --topic T --server S
"""
import argparse
import signal
import sys
import threading

from oslo_config import cfg
import oslo_messaging as om


class PingEndpoint:
    target = om.Target(version='6.0')

    def ping(self, ctxt):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--url', required=True)
    ap.add_argument('--topic', required=True)
    ap.add_argument('--server', required=True)
    ap.add_argument('--exchange', default='nova')
    args = ap.parse_args()

    conf = cfg.ConfigOpts()
    conf([])
    om.set_transport_defaults(args.exchange)
    transport = om.get_rpc_transport(conf, url=args.url)
    server = om.get_rpc_server(transport, om.Target(topic=args.topic, server=args.server),
                               [PingEndpoint()], executor='threading')
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    server.start()
    print('READY', flush=True)
    stop.wait()
    server.stop()
    server.wait()
    transport.cleanup()


if __name__ == '__main__':
    main()
