import { inspect } from 'node:util';

const REDACTED = '[redacted]';

/**
 * A credential held in memory only (a caller's keystone token): it never turns into text by
 * accident. JSON.stringify, String(), template literals and util.inspect (so pino and console) all
 * give `[redacted]`; only reveal() gives the value, at the one place it is sent.
 */
export class Secret {
  readonly #value: string;

  constructor(value: string) {
    this.#value = value;
  }

  reveal(): string {
    return this.#value;
  }

  toJSON(): string {
    return REDACTED;
  }

  toString(): string {
    return REDACTED;
  }

  [inspect.custom](): string {
    return REDACTED;
  }
}
