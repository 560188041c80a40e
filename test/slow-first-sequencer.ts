import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * The slowest test files first (measured: seconds of one 2-core CI run), so that the two workers
 * end together instead of one running a long file alone at the end. vitest's own order puts files
 * it has no timings for (a clean clone) by size, and the crash matrices are short files of long tests.
 */
const SLOWEST_FIRST = [
  'crash-matrix-libvirt-b', // 244
  'crash-matrix-libvirt-a', // 209
  'strategies-qemu', // 163
  'libvirt-strategies', // 141
  'crash-matrix-deferred-live', // 113
  'qemu-live-store-trouble', // 101
  'crash-matrix-suspend', // 91
  'linux-quiesced', // 90
  'linux-unquiesced', // 76
  'linux-quiesce', // 69
  'libvirt-live-store',
  'concurrency-qemu', // 53
  'recovery', // 48
  'cleanup-recovery', // 41
];

function rank(spec: TestSpecification): number {
  const i = SLOWEST_FIRST.findIndex((name) => spec.moduleId.endsWith(`/${name}.test.ts`));
  return i < 0 ? SLOWEST_FIRST.length : i;
}

export class SlowestFirstSequencer extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const base = await super.sort(files);
    // Stable: groups and projects keep vitest's order; within one, the known slow files lead.
    return base
      .map((spec, index) => ({ spec, index }))
      .sort((a, b) => {
        const group = a.spec.project.config.sequence.groupOrder - b.spec.project.config.sequence.groupOrder;
        if (group !== 0) return group;
        if (a.spec.project.name !== b.spec.project.name) return a.index - b.index;
        return rank(a.spec) - rank(b.spec) || a.index - b.index;
      })
      .map(({ spec }) => spec);
  }
}
