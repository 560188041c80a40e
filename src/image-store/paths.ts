import path from 'node:path';
import { InvalidImageId } from '../errors.js';
import { isUuid } from '../util/uuid.js';

export const PARTIAL_DIR = '.partial';
export const LOCKS_DIR = '.locks';

/**
 * Throws InvalidImageId unless `id` is a UUID. Every public entry point of the store calls this
 * before touching any file, so an id can never name a path outside the store.
 */
export function validateImageId(id: unknown): asserts id is string {
  if (!isUuid(id)) throw new InvalidImageId(typeof id === 'string' ? id : String(id));
}

/** The file layout of one store: `<root>/<id>`, `<root>/<id>.json`, `<root>/.partial/<id>`. */
export class StorePaths {
  readonly root: string;
  readonly partialDir: string;
  /** `<root>/.locks/<id>.lock`: the cross-process lock of each image (src/util/pid-lock.ts). */
  readonly locksDir: string;

  constructor(root: string) {
    this.root = path.resolve(root);
    this.partialDir = path.join(this.root, PARTIAL_DIR);
    this.locksDir = path.join(this.root, LOCKS_DIR);
  }

  data(id: string): string {
    return this.inside(this.root, id);
  }

  meta(id: string): string {
    return this.inside(this.root, `${id}.json`);
  }

  partial(id: string): string {
    return this.inside(this.partialDir, id);
  }

  lock(id: string): string {
    return this.inside(this.locksDir, `${id}.lock`);
  }

  /** Joins and asserts the result is a direct child of `dir` (defence in depth behind validateImageId). */
  private inside(dir: string, name: string): string {
    const p = path.join(dir, name);
    if (path.dirname(p) !== dir || path.basename(p) !== name) throw new InvalidImageId(name);
    return p;
  }
}
