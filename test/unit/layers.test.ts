import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

/**
 * Imports run one way (the design rule): each part of src/ has a layer, and a module imports only
 * modules of its own part or of a lower layer — types included, since a type import is a dependency
 * of the design even where it costs nothing at run time. Parts of the same layer do not import each
 * other. And no module imports itself through others (no cycle), inside a part either.
 */
const LAYERS: Record<string, number> = {
  'errors.ts': 0,
  'log.ts': 0,
  util: 1,
  // The Prometheus metrics registry (prom-client only): facts are recorded into it at every layer.
  metrics: 1,
  config: 2,
  'qemu-img': 3,
  messaging: 3,
  'image-store': 3,
  hypervisor: 4,
  'guest-check': 5,
  snapshot: 5,
  compute: 6,
  // The wiring of a process: the runtime, the agent, start-up recovery.
  service: 7,
  cli: 8,
};

const SRC = path.resolve(import.meta.dirname, '../../src');

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(p);
    return e.name.endsWith('.ts') ? [p] : [];
  });
}

/** The part of src/ a file belongs to: its top-level folder, or its own name at the top. */
function partOf(file: string): string {
  return path.relative(SRC, file).split(path.sep)[0]!;
}

/** The src/ files a module imports (static, re-exports, dynamic; `import type` too). */
function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const specs = [...text.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)['"](\.{1,2}\/[^'"]+)['"]/gm)].map((m) => m[1]!);
  return specs.map((s) => path.resolve(path.dirname(file), s.replace(/\.js$/, '.ts')));
}

/** Imports from a part to a part of the same or a higher layer. */
function upwardImports(graph: Map<string, string[]>): string[] {
  const upward: string[] = [];
  for (const [file, deps] of graph) {
    const from = partOf(file);
    for (const dep of deps) {
      const to = partOf(dep);
      if (to === from) continue;
      if (!(LAYERS[to]! < LAYERS[from]!)) upward.push(`${path.relative(SRC, file)} (${from}, layer ${LAYERS[from]}) imports ${path.relative(SRC, dep)} (${to}, layer ${LAYERS[to]})`);
    }
  }
  return upward;
}

/** Every cycle a depth-first walk meets, as `a -> b -> a`. */
function cyclesOf(graph: Map<string, string[]>): string[] {
  const cycles: string[] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string): void => {
    state.set(f, 'open');
    stack.push(f);
    for (const d of graph.get(f) ?? []) {
      if (state.get(d) === 'open') cycles.push([...stack.slice(stack.indexOf(d)), d].map((x) => path.relative(SRC, x)).join(' -> '));
      else if (!state.has(d) && graph.has(d)) visit(d);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of graph.keys()) if (!state.has(f)) visit(f);
  return cycles;
}

const files = sourceFiles(SRC);
const graph = new Map(files.map((f) => [f, importsOf(f)]));

describe('the layers of src/', () => {
  it('every part of src/ has a layer', () => {
    expect([...new Set(files.map(partOf))].filter((p) => !(p in LAYERS))).toEqual([]);
  });

  it('every relative import names a file that exists', () => {
    const missing = [...graph].flatMap(([f, deps]) => deps.filter((d) => !fs.existsSync(d)).map((d) => `${path.relative(SRC, f)} -> ${path.relative(SRC, d)}`));
    expect(missing).toEqual([]);
  });

  it('imports go down only (or stay inside their own part)', () => {
    expect(upwardImports(graph)).toEqual([]);
  });

  it('no module imports itself through others', () => {
    expect(cyclesOf(graph)).toEqual([]);
  });

  it('the checks find an upward import and a cycle when there is one', () => {
    const a = path.join(SRC, 'snapshot/a.ts');
    const b = path.join(SRC, 'compute/b.ts');
    const c = path.join(SRC, 'snapshot/c.ts');
    const bad = new Map([
      [a, [b, c]],
      [b, []],
      [c, [a]],
    ]);
    expect(upwardImports(bad)).toEqual(['snapshot/a.ts (snapshot, layer 5) imports compute/b.ts (compute, layer 6)']);
    expect(cyclesOf(bad)).toEqual(['snapshot/a.ts -> snapshot/c.ts -> snapshot/a.ts']);
    // And the real graph is read: the CLI's entry point imports the runtime.
    expect(graph.get(path.join(SRC, 'cli/main.ts'))).toContain(path.join(SRC, 'service/runtime.ts'));
  });
});
