import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * The slowest test files first (measured: seconds of one 2-core CI run), so that the two workers
 * end together instead of one running a long file alone at the end. vitest's own order puts files
 * it has no timings for (a clean clone) by size, and the crash matrices are short files of long tests.
 */
const SLOWEST_FIRST = [
  'crash-matrix-libvirt-b', // 212
  'strategies-qemu', // 201 (256 MiB disks then)
  'libvirt-strategies', // 161
  'crash-matrix-libvirt-a', // 140
  'crash-matrix-deferred-live', // 113
  'qemu-live-store-trouble', // 107
  'crash-matrix-suspend', // 106
  'linux-quiesced', // 98
  'linux-unquiesced', // 77
  'concurrency-qemu', // 63
  'linux-quiesce', // 57
  'glance', // 51
  'oslo-interop', // 41
  'disk-full', // 41
  'qemu-live', // 38
  'guest-failures', // 35
  'snapshot-interrupt', // 31
  'recovery', // 31
  'cleanup-recovery', // 29
  'hostile-cli', // 28
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
