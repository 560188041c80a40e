/** The simulated guest agent (qemu-ga) of a fake instance: `FakeHypervisor.setGuestAgent`. */
export interface FakeGuestAgent {
  /** The agent is installed and running in the guest. */
  present: boolean;
  /** guest-fsfreeze-freeze answers with an error (nothing is frozen). */
  freezeFails?: boolean;
  /** guest-fsfreeze-thaw answers with an error (the filesystems stay frozen): always, or the next n times. */
  thawFails?: boolean | number;
  /**
   * The agent does not answer within the timeout: every command (true: it is not available), or
   * only the freeze (which takes effect: the filesystems end up frozen), or only the thaw (which
   * does not).
   */
  hangs?: boolean | 'freeze' | 'thaw';
}

/** How many filesystems a fake guest has to freeze. */
export const FAKE_GUEST_FILESYSTEMS = 2;
