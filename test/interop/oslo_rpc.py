#!/usr/bin/python3
"""Drives the agent's RPC server as nova does: through oslo.messaging's RPC client on real RabbitMQ.

usage: oslo_rpc.py TRANSPORT_URL SERVER STEPS_JSON

STEPS_JSON is a JSON list of steps, run in order:
  {"name": str, "kind": "call"|"cast", "method": str, "args": {..},
   "version": "6.0", "timeout": 60, "exmods": false, "context": {..}}
"exmods": true lets the client rebuild oslo_messaging.rpc.dispatcher exceptions (NoSuchMethod,
UnsupportedVersion) from the failure; otherwise they arrive as oslo_messaging.RemoteError.
Each step prints one JSON line:
  {"name", "ok": true, "result": ...}                                   (a cast's result is null)
  {"name", "ok": false, "exc_module", "exc_class", "exc_type", "is_a", "message"}
"is_a" lists the oslo.messaging exception classes the exception is an instance of (a rebuilt
remote exception is a subclass named e.g. NoSuchMethod_Remote, in module ..._Remote).
Exit code 0 when every step ran (failed calls included), 2 on bad usage.
"""
import json
import sys

from oslo_config import cfg
import oslo_messaging as om
from oslo_messaging._metrics import client as metrics_client

DISPATCHER_MODULE = 'oslo_messaging.rpc.dispatcher'
OSLO_EXCEPTIONS = [om.NoSuchMethod, om.UnsupportedVersion, om.RemoteError, om.MessagingTimeout]


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, server, steps = argv[1], argv[2], json.loads(argv[3])
    conf = cfg.ConfigOpts()
    conf([])
    # oslo.messaging 14's RPC client reads these options; a bare ConfigOpts lacks them.
    conf.register_opts(metrics_client.oslo_messaging_metrics, group='oslo_messaging_metrics')
    om.set_transport_defaults('nova')
    plain = om.get_rpc_transport(conf, url=url)
    with_exmods = om.get_rpc_transport(conf, url=url, allowed_remote_exmods=[DISPATCHER_MODULE])
    target = om.Target(exchange='nova', topic='compute', server=server, version='6.0')
    try:
        for step in steps:
            transport = with_exmods if step.get('exmods') else plain
            client = om.get_rpc_client(transport, target, timeout=step.get('timeout', 60))
            if 'version' in step:
                client = client.prepare(version=step['version'])
            ctxt = step.get('context', {'request_id': 'req-' + step['name'], 'user_id': 'py-user', 'project_id': 'py-project'})
            out = {'name': step['name']}
            try:
                if step['kind'] == 'cast':
                    client.cast(ctxt, step['method'], **step.get('args', {}))
                    result = None
                else:
                    result = client.call(ctxt, step['method'], **step.get('args', {}))
                out.update(ok=True, result=result)
            except Exception as exc:  # the point is to report what oslo raised
                out.update(
                    ok=False,
                    exc_module=type(exc).__module__,
                    exc_class=type(exc).__name__,
                    exc_type=getattr(exc, 'exc_type', None),
                    is_a=[c.__name__ for c in OSLO_EXCEPTIONS if isinstance(exc, c)],
                    message=str(exc).splitlines()[0] if str(exc) else '',
                )
            print(json.dumps(out), flush=True)
    finally:
        plain.cleanup()
        with_exmods.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
