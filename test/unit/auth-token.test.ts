import { inspect } from 'node:util';
import { describe, expect, it } from 'vitest';
import { decodeRequest, encodeEnvelope } from '../../src/messaging/envelope.js';
import { Secret } from '../../src/util/secret.js';
import { captureLogger } from '../helpers/log-capture.js';

const TOKEN = 'gAAAAABn-token-of-the-caller-0123456789';

function message(extra: Record<string, unknown>): Buffer {
  return encodeEnvelope({ method: 'snapshot_instance', args: { instance: { uuid: 'x' }, image_id: 'y' }, version: '6.0', _context_request_id: 'req-1', _context_project_id: 'p', ...extra });
}

describe("the caller's keystone token", () => {
  it('is kept beside the request, never in it (the request is what gets journaled)', () => {
    const d = decodeRequest(message({ _context_auth_token: TOKEN }));
    expect(d.ok).toBe(true);
    if (!d.ok) return;
    expect(d.authToken?.reveal()).toBe(TOKEN);
    expect(d.request.context).not.toHaveProperty('auth_token');
    expect(JSON.stringify(d.request)).not.toContain(TOKEN);
  });

  it('is none when absent, null or not a printable string', () => {
    for (const v of [undefined, null, '', 42, 'two words', 'x'.repeat(20_000)]) {
      const d = decodeRequest(message(v === undefined ? {} : { _context_auth_token: v }));
      expect(d.ok).toBe(true);
      expect(d.ok && d.authToken).toBe(undefined);
    }
  });

  it('never turns into text: JSON, String, inspect and pino all give [redacted]', () => {
    const s = new Secret(TOKEN);
    const { log, lines } = captureLogger();
    log.info({ token: s, ctx: { authToken: s } }, `token ${s}`);
    const texts = [JSON.stringify({ s }), String(s), `${s}`, inspect({ s }), JSON.stringify(lines)];
    for (const t of texts) expect(t).not.toContain(TOKEN);
    expect(JSON.stringify(lines)).toContain('[redacted]');
  });
});
