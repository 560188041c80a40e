import { SnapshotDriverError } from '../errors.js';

/**
 * The image's status does not allow the operation (e.g. verify of an image that is not active,
 * commit of a killed one).
 */
export class ImageInvalidState extends SnapshotDriverError {}

/** A metadata file that does not parse, or an active image whose data file is missing. */
export class ImageStoreCorrupt extends SnapshotDriverError {}

/** Glance answered with an error status: the message names the request, the status and Glance's own message (trimmed). */
export class GlanceError extends SnapshotDriverError {
  constructor(
    message: string,
    readonly status: number,
    readonly glanceMessage: string,
  ) {
    super(message);
  }
}

/**
 * No Glance API server answered (connection refused or reset, a timeout, a server that stopped
 * reading), after the bounded retries over every `[glance] api_servers`.
 */
export class GlanceUnavailable extends SnapshotDriverError {}

/**
 * `[glance] auth_strategy = keystone` and the operation has no token to send: a request carried out
 * again from the journal after a crash (tokens are never journaled), or a command-line operation.
 */
export class GlanceAuthMissing extends SnapshotDriverError {}

/** The image Glance made of the upload is not what the agent sent (size, hash), or not active. */
export class GlanceUploadMismatch extends SnapshotDriverError {}

/**
 * A streamed upload (the export's data sent to Glance as it was made, nothing staged) was cut, and
 * Glance has put the image back in `queued`: the export may be run again from its start into a
 * fresh upload (the store said so within `[glance] retries`).
 */
export class StreamedUploadCut extends SnapshotDriverError {}
