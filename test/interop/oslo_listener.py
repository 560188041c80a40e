#!/usr/bin/python3
"""Listens to the agent's notifications as a nova-style consumer does: oslo.messaging's notification
listener on the control exchange "nova", topics versioned_notifications and notifications.

usage: oslo_listener.py TRANSPORT_URL TIMEOUT_S EVENT_TYPE[=COUNT]...

Prints {"ready": true} once listening, then one JSON line per notification:
  {"priority", "publisher_id", "event_type", "payload", "ctxt", "metadata"}
Exits 0 once every EVENT_TYPE given has been seen (COUNT times, default 1), 3 (after {"timeout": true}) when TIMEOUT_S
passes first, 2 on bad usage.
"""
import json
import sys
import threading

from oslo_config import cfg
import oslo_messaging as om


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, timeout_s = argv[1], float(argv[2])
    wanted = {}
    for arg in argv[3:]:
        event_type, _, count = arg.partition('=')
        wanted[event_type] = int(count or '1')
    conf = cfg.ConfigOpts()
    conf([])
    om.set_transport_defaults('nova')
    transport = om.get_notification_transport(conf, url=url)
    lock = threading.Lock()
    seen = {}
    all_seen = threading.Event()

    class Endpoint:
        def _record(self, priority, ctxt, publisher_id, event_type, payload, metadata):
            line = {'priority': priority, 'publisher_id': publisher_id, 'event_type': event_type,
                    'payload': payload, 'ctxt': ctxt, 'metadata': metadata}
            with lock:
                print(json.dumps(line), flush=True)
                seen[event_type] = seen.get(event_type, 0) + 1
                if all(seen.get(e, 0) >= n for e, n in wanted.items()):
                    all_seen.set()

        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            self._record('info', ctxt, publisher_id, event_type, payload, metadata)

        def error(self, ctxt, publisher_id, event_type, payload, metadata):
            self._record('error', ctxt, publisher_id, event_type, payload, metadata)

    targets = [om.Target(topic='versioned_notifications'), om.Target(topic='notifications')]
    listener = om.get_notification_listener(transport, targets, [Endpoint()], executor='threading')
    listener.start()
    print(json.dumps({'ready': True}), flush=True)
    ok = all_seen.wait(timeout_s)
    listener.stop()
    listener.wait()
    transport.cleanup()
    if not ok:
        print(json.dumps({'timeout': True, 'seen': seen}), flush=True)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
