import { createReadStream, createWriteStream } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import { pipeline } from 'node:stream/promises';
import { QemuProcessError } from '../../errors.js';

/**
 * QEMU 7.2 cannot migrate to a file, so a managed save goes through a unix socket: the agent
 * listens, QEMU connects and sends its migration stream, the agent writes it to the state file.
 * A resume is the reverse: the new QEMU listens (`migrate-incoming`), the agent sends the file.
 */

/** Receives one migration stream on a unix socket into a file. */
export class MigrationReceiver {
  /** Resolves with the byte count once the stream has ended and the file is fsynced. */
  readonly done: Promise<number>;
  private constructor(
    private readonly server: net.Server,
    readonly socketPath: string,
    done: Promise<number>,
    private readonly stop: () => Promise<void>,
  ) {
    this.done = done;
    // The caller may give up before awaiting `done` (e.g. the migrate command failed).
    this.done.catch(() => undefined);
  }

  /**
   * Listens on `socketPath` (must not exist) and accepts a single connection. `beforeReading` (a test
   * hook: a destination that stalls) is called with that connection; the stream is read once it settles.
   */
  static async listen(
    socketPath: string,
    destFile: string,
    beforeReading?: (socket: net.Socket) => Promise<void> | void,
  ): Promise<MigrationReceiver> {
    const server = net.createServer();
    let resolveDone!: (n: number) => void;
    let rejectDone!: (err: Error) => void;
    const done = new Promise<number>((res, rej) => {
      resolveDone = res;
      rejectDone = rej;
    });
    let connected = false;
    let accepted: net.Socket | undefined;
    /** The file's writing, once begun: settles when the file is closed. */
    let receiving: Promise<number> | undefined;
    server.once('connection', (socket) => {
      connected = true;
      accepted = socket;
      server.close();
      const ready = beforeReading === undefined ? Promise.resolve() : Promise.resolve().then(() => beforeReading(socket));
      ready.then(() => {
        if (socket.destroyed) throw new QemuProcessError(`migration stream on ${socketPath} aborted`);
        receiving = receiveInto(socket, destFile);
        return receiving;
      }).then(resolveDone, rejectDone);
    });
    server.on('close', () => {
      if (!connected) rejectDone(new QemuProcessError(`no migration stream arrived on ${socketPath}`));
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const stop = async () => {
      rejectDone(new QemuProcessError(`migration stream on ${socketPath} aborted`));
      accepted?.destroy();
      // Its file closed before the caller removes it (else a late open could create it again).
      await receiving?.catch(() => undefined);
    };
    return new MigrationReceiver(server, socketPath, done, stop);
  }

  /** Stops listening and removes the socket file (a stream in progress is not affected). */
  async close(): Promise<void> {
    if (this.server.listening) await new Promise<void>((r) => this.server.close(() => r()));
    await fs.rm(this.socketPath, { force: true });
  }

  /** A failed save: also ends a stream in progress (`done` rejects), and resolves once its file is closed. */
  async abort(): Promise<void> {
    await this.stop();
    await this.close();
  }
}

async function receiveInto(socket: net.Socket, destFile: string): Promise<number> {
  await pipeline(socket, createWriteStream(destFile, { mode: 0o600 }));
  // fsync works on the inode: a second descriptor flushes what the stream wrote.
  const fh = await fs.open(destFile, 'r');
  try {
    await fh.sync();
    return (await fh.stat()).size;
  } finally {
    await fh.close();
  }
}

/** Connects to a listening QEMU and sends `srcFile` as its incoming migration stream. */
export async function sendMigrationStream(socketPath: string, srcFile: string): Promise<number> {
  const socket = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.createConnection({ path: socketPath });
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
  const { size } = await fs.stat(srcFile);
  try {
    // pipeline ends the socket's write side once the whole file is sent.
    await pipeline(createReadStream(srcFile), socket);
  } catch (err) {
    // QEMU closes the connection as soon as it has read the end of the stream, which can beat our
    // own end of writing (seen under load as "Premature close"). Whether the state was loaded is
    // for the migration status to say, not this socket.
    if (!(socket.bytesWritten >= size && isPeerClose(err))) throw err;
  } finally {
    socket.destroy();
  }
  return size;
}

function isPeerClose(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'EPIPE' || code === 'ECONNRESET';
}
