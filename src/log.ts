import { pino, type Logger } from 'pino';

export type { Logger };

/** Keys whose values never reach a log line. */
const REDACT = [
  'password',
  '*.password',
  '*.*.password',
  'transport_url',
  '*.transport_url',
  '*.*.transport_url',
];

/** The agent's logger: pino JSON on stderr (fd 2), passwords redacted. */
export function createLogger(opts: { level?: string; name?: string } = {}): Logger {
  return pino(
    {
      name: opts.name ?? 'snapshot-driver',
      level: opts.level ?? process.env.SNAPSHOT_DRIVER_LOG_LEVEL ?? 'info',
      redact: { paths: REDACT, censor: '***' },
    },
    pino.destination({ fd: 2, sync: true }),
  );
}

/** A logger that drops everything (for unit tests). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/** The child logger of one operation: every line carries request_id and instance_uuid. */
export function operationLogger(parent: Logger, requestId: string, instanceUuid: string): Logger {
  return parent.child({ request_id: requestId, instance_uuid: instanceUuid });
}
