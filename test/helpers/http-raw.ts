import net from 'node:net';

/**
 * HTTP/1.1 by hand, for the metrics endpoint's tests: requests exactly as written (hostile ones
 * included), and what came back, down to whether the server closed the connection.
 */

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
  /** The server closed the connection after its answer (or without one). */
  closed: boolean;
  /** Everything received, as text. */
  raw: string;
}

/**
 * Sends `request` as it is on a fresh connection and reads the answer: until the server closes the
 * connection, or one whole response has come (headers and Content-Length bytes) and the connection
 * stays open a moment longer.
 */
export function rawRequest(port: number, request: string | Buffer, host = '127.0.0.1'): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    const chunks: Buffer[] = [];
    let settleTimer: NodeJS.Timeout | undefined;
    const guard = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer within 20 s to ${JSON.stringify(String(request).slice(0, 60))}`));
    }, 20_000);
    const finish = (closed: boolean) => {
      clearTimeout(guard);
      if (settleTimer) clearTimeout(settleTimer);
      socket.destroy();
      const raw = Buffer.concat(chunks).toString('latin1');
      const end = raw.indexOf('\r\n\r\n');
      const head = end < 0 ? raw : raw.slice(0, end);
      const [statusLine, ...lines] = head.split('\r\n');
      const headers: Record<string, string> = {};
      for (const l of lines) {
        const i = l.indexOf(':');
        if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
      }
      const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(statusLine ?? '')?.[1] ?? 0);
      resolve({ status, headers, body: end < 0 ? '' : raw.slice(end + 4), closed, raw });
    };
    socket.on('data', (c: Buffer) => {
      chunks.push(c);
      const raw = Buffer.concat(chunks).toString('latin1');
      const end = raw.indexOf('\r\n\r\n');
      const length = Number(/\r\ncontent-length: (\d+)/i.exec(raw.slice(0, Math.max(end, 0)))?.[1] ?? NaN);
      // A whole answer on a connection kept open: wait a little for a close that may follow.
      if (end >= 0 && Buffer.byteLength(raw.slice(end + 4), 'latin1') >= length) {
        settleTimer ??= setTimeout(() => finish(false), 300);
      }
    });
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.on('error', () => finish(true));
    socket.write(request);
  });
}

/** A GET request's text (`extra`: more header lines, each ending with CRLF). */
export const get = (path: string, extra = '') => `GET ${path} HTTP/1.1\r\nHost: localhost\r\n${extra}\r\n`;

/**
 * Sends `request` one byte every `gapMs`, as a slow (or hostile) client does. Resolves once the
 * server closed the connection (with what it answered, and how many bytes had been sent), or once
 * every byte is sent and the server has answered or stayed silent for a while (`closed` false).
 */
export function trickle(port: number, request: string, gapMs: number, host = '127.0.0.1'): Promise<{ closed: boolean; sent: number; answer: string }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    let sent = 0;
    let answer = '';
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      if (timer) clearTimeout(timer);
      socket.destroy();
      resolve({ closed, sent, answer });
    };
    const next = () => {
      if (done) return;
      if (sent === request.length) {
        timer = setTimeout(() => finish(false), 2_000);
        return;
      }
      socket.write(request[sent]!, (err) => {
        if (err) return finish(true);
        sent += 1;
        timer = setTimeout(next, gapMs);
      });
    };
    socket.on('connect', next);
    socket.on('data', (c: Buffer) => (answer += c.toString('latin1')));
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.on('error', (err) => (sent === 0 ? reject(err) : finish(true)));
  });
}
