import { SnapshotDriverError } from '../errors.js';

/**
 * The image's status does not allow the operation (e.g. verify of an image that is not active,
 * commit of a killed one).
 */
export class ImageInvalidState extends SnapshotDriverError {}

/** A metadata file that does not parse, or an active image whose data file is missing. */
export class ImageStoreCorrupt extends SnapshotDriverError {}
