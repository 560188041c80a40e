/**
 * A beforeStep hook that holds every operation reaching step `name` until release(): `reached`
 * resolves when the first one gets there (e.g. a guest held down in its managed save, before its
 * snapshot is made).
 */
export function holdAtStep(name: string): { hook: (step: { name: string }) => Promise<void>; reached: Promise<void>; release: () => void } {
  let arrive!: () => void;
  const reached = new Promise<void>((r) => (arrive = r));
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  return {
    hook: async (step) => {
      if (step.name !== name) return;
      arrive();
      await released;
    },
    reached,
    release,
  };
}
