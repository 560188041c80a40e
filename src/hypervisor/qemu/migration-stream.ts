import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import { QemuProcessError } from '../../errors.js';
import { onCpus } from '../../util/affinity.js';

/**
 * QEMU 7.2 cannot migrate into a file, nor take a descriptor for one but over its monitor socket
 * (SCM_RIGHTS, which Node cannot send), so a managed save goes through a unix socket: the agent
 * listens, QEMU connects and sends its migration stream, and `cat` copies it into the state file.
 * (A resume needs no stream: the new process inherits the state file's descriptor at launch.)
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
    /** The CPUs the copy runs on (QemuGuests.guestCpus); undefined: the agent's. */
    cpus?: string,
  ): Promise<MigrationReceiver> {
    // Nothing is read from the connection here: it is handed to the copy as it is.
    const server = net.createServer({ pauseOnConnect: true });
    let resolveDone!: (n: number) => void;
    let rejectDone!: (err: Error) => void;
    const done = new Promise<number>((res, rej) => {
      resolveDone = res;
      rejectDone = rej;
    });
    let connected = false;
    let accepted: net.Socket | undefined;
    let copy: ChildProcess | undefined;
    /** The file's writing, once begun: settles when the file is closed. */
    let receiving: Promise<number> | undefined;
    server.once('connection', (socket) => {
      connected = true;
      accepted = socket;
      server.close();
      const ready = beforeReading === undefined ? Promise.resolve() : Promise.resolve().then(() => beforeReading(socket));
      ready.then(() => {
        if (socket.destroyed) throw new QemuProcessError(`migration stream on ${socketPath} aborted`);
        receiving = receiveInto(socket, destFile, (c) => (copy = c), cpus);
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
      copy?.kill('SIGKILL');
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

/** While the stream is copied, the file is fdatasynced this often (see receiveInto). */
const WRITEBACK_INTERVAL_MS = 100;
/** The copy's stderr kept for its error message. */
const STDERR_MAX_BYTES = 4096;

/**
 * Copies the stream into the file with `cat` (an argument vector: its stdin the connection, its
 * stdout the file), so that the data never passes through the agent: read by Node, a save of
 * 512 MiB took 1.3× as long as QEMU writing into `cat` itself, and seconds more on a busy host.
 * Meanwhile the file is fdatasynced every WRITEBACK_INTERVAL_MS, so that its writeback to disk
 * overlaps the stream instead of all of it coming after (the final fsync has little left to do).
 * `started` gets the copy's process (to kill it when the save is given up).
 */
async function receiveInto(socket: net.Socket, destFile: string, started: (copy: ChildProcess) => void, cpus: string | undefined): Promise<number> {
  const fh = await fs.open(destFile, 'w', 0o600);
  try {
    const copy = spawn(...onCpus('cat', [], cpus), { stdio: [socket, fh.fd, 'pipe'] });
    started(copy);
    // cat holds the connection now; ours is not needed (closing it does not end cat's).
    socket.destroy();
    let stderr = '';
    copy.stderr?.on('data', (chunk: Buffer) => {
      if (stderr.length < STDERR_MAX_BYTES) stderr += chunk.toString('utf8');
    });
    const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      copy.once('error', reject);
      copy.once('close', (code, signal) => resolve([code, signal]));
    });
    let copying = true;
    const writeback = (async () => {
      while (copying) {
        await new Promise((r) => setTimeout(r, WRITEBACK_INTERVAL_MS));
        if (copying) await fh.datasync();
      }
    })();
    writeback.catch(() => undefined); // its error is thrown below, once the copy has ended
    const [code, signal] = await exited.finally(() => (copying = false));
    await writeback;
    if (code !== 0) {
      throw new QemuProcessError(`copying the migration stream into ${destFile} failed: cat ${signal ? `killed by ${signal}` : `exited with ${code}`}${stderr.trim() ? `: ${stderr.trim()}` : ''}`);
    }
    await fh.sync();
    return (await fh.stat()).size;
  } finally {
    await fh.close();
  }
}
