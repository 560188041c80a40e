import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { dir } from 'tmp-promise';
import { qemuArgv } from '../../src/hypervisor/qemu/launch.js';
import { bootFieldsProblem, InstanceLayout, readInstanceRecord, resolveBootFiles, type InstanceRecord } from '../../src/hypervisor/qemu/layout.js';

/** instance.json's kernel/initrd/cmdline (SPEC §4): direct kernel boot, and the serial console file. */

let tmp: { path: string; cleanup(): Promise<void> };
beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
});
afterEach(async () => {
  await tmp.cleanup();
});

const RECORD: InstanceRecord = { uuid: '3a1f5e2c-8b4d-4c6e-9f0a-1b2c3d4e5f60', name: 'g', memory_mb: 128, vcpus: 1, machine: 'pc' };

describe('boot fields', () => {
  it.each([
    [{}, undefined],
    [{ kernel: '/boot/vmlinuz', initrd: 'initrd.img', cmdline: 'console=ttyS0 quiet' }, undefined],
    [{ kernel: 'boot/../vmlinuz' }, undefined],
    [{ kernel: '../vmlinuz' }, /"kernel" "\.\.\/vmlinuz" is relative and leaves the instance folder/],
    [{ kernel: '/k', initrd: 'a/../../b' }, /"initrd" "a\/\.\.\/\.\.\/b" is relative and leaves the instance folder/],
    [{ kernel: '' }, /"kernel" must be a non-empty path/],
    [{ kernel: 5 }, /"kernel" must be a non-empty path/],
    [{ kernel: '/k', cmdline: 'a\nb' }, /"cmdline" must be a string of one line/],
    [{ kernel: '/k', cmdline: 'x'.repeat(2048) }, /"cmdline" is longer than 2047 bytes/],
    [{ initrd: '/i' }, /"initrd" and "cmdline" need a "kernel"/],
    [{ cmdline: 'quiet' }, /"initrd" and "cmdline" need a "kernel"/],
  ] as const)('%j → %s', (fields, problem) => {
    const found = bootFieldsProblem(fields as never);
    if (problem === undefined) expect(found).toBeUndefined();
    else expect(found).toMatch(problem);
  });

  it('resolves files against the instance folder and names the field of one that is missing or not a file', async () => {
    const inst = path.join(tmp.path, 'inst');
    await fs.mkdir(inst);
    await fs.writeFile(path.join(inst, 'vmlinuz'), 'k');
    await fs.writeFile(path.join(tmp.path, 'initrd.img'), 'i');
    expect(await resolveBootFiles(inst, { kernel: 'vmlinuz', initrd: path.join(tmp.path, 'initrd.img'), cmdline: 'quiet' })).toEqual({
      kernel: path.join(inst, 'vmlinuz'),
      initrd: path.join(tmp.path, 'initrd.img'),
      cmdline: 'quiet',
    });
    await expect(resolveBootFiles(inst, { kernel: 'nope' })).rejects.toThrow(`"kernel" "${path.join(inst, 'nope')}" does not exist`);
    await expect(resolveBootFiles(inst, { kernel: 'vmlinuz', initrd: tmp.path })).rejects.toThrow(`"initrd" "${tmp.path}" is not a regular file`);
  });

  it('instance.json: boot fields are read back; a bad one is refused naming the file and the field', async () => {
    const file = path.join(tmp.path, 'instance.json');
    await fs.writeFile(file, JSON.stringify({ ...RECORD, kernel: 'vmlinuz', cmdline: 'console=ttyS0' }));
    expect(await readInstanceRecord(file)).toEqual({ ...RECORD, kernel: 'vmlinuz', cmdline: 'console=ttyS0' });
    await fs.writeFile(file, JSON.stringify({ ...RECORD, kernel: '../../etc/vmlinuz' }));
    await expect(readInstanceRecord(file)).rejects.toThrow(`${file}: "kernel" "../../etc/vmlinuz" is relative and leaves the instance folder`);
  });
});

describe('QEMU command line', () => {
  const layout = new InstanceLayout('/var/lib/i,x', RECORD.uuid);

  it('boots the kernel directly when given, and always appends the serial console to console.log', () => {
    const argv = qemuArgv(RECORD, layout, 'tcg', { kernel: '/k/vmlinuz', initrd: '/k/initrd.img', cmdline: 'console=ttyS0 root=/dev/vda' });
    const after = (flag: string) => argv[argv.indexOf(flag) + 1];
    expect(after('-kernel')).toBe('/k/vmlinuz');
    expect(after('-initrd')).toBe('/k/initrd.img');
    expect(after('-append')).toBe('console=ttyS0 root=/dev/vda');
    // A comma in the path is escaped in the chardev's option list.
    expect(argv).toContain(`file,id=console0,path=/var/lib/i,,x/${RECORD.uuid}/console.log,append=on`);
    expect(after('-serial')).toBe('chardev:console0');
  });

  it('without a kernel, boots from the disk as before', () => {
    const argv = qemuArgv(RECORD, layout, 'tcg');
    for (const flag of ['-kernel', '-initrd', '-append']) expect(argv).not.toContain(flag);
    expect(argv).toContain('chardev:console0');
  });
});
