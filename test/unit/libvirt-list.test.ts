import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt/libvirt-hypervisor.js';
import { silentLogger } from '../../src/log.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';

/**
 * `list()` asks libvirt for every domain's state in one virsh process. A domain undefined between
 * `list --uuid` and that call (another tool, another test) fails the whole batch; the listing must
 * still come back, without the domain that is gone. virsh here is a script that answers as virsh 9.0
 * does, with the second domain gone.
 */

const KEPT = 'ab6c642d-3c09-4309-a9dd-ed194002267a';
const GONE = 'e7f76918-daa1-46e4-b645-d333154bf429';

const FAKE_VIRSH = `#!/usr/bin/env node
const args = process.argv.slice(2).filter((a, i, all) => a !== '-q' && a !== '-c' && all[i - 1] !== '-c');
const kept = '${KEPT}', gone = '${GONE}';
const info = (u) => 'Id:             3\\nName:           kept\\nUUID:           ' + u + '\\nOS Type:        hvm\\nState:          running\\nPersistent:     yes\\nManaged save:   no\\n\\n';
const fail = (u) => { process.stderr.write("error: failed to get domain '" + u + "'\\n"); process.exit(1); };
if (args[0] === 'list') { process.stdout.write(kept + '\\n' + gone + '\\n\\n'); process.exit(0); }
if (args.length === 1) {
  for (const cmd of args[0].split('; ')) { const u = cmd.split(' ')[1]; if (u === gone) fail(u); process.stdout.write(info(u)); }
  process.exit(0);
}
if (args[0] === 'dominfo') { if (args[1] === gone) fail(args[1]); process.stdout.write(info(args[1])); process.exit(0); }
process.stderr.write('error: unexpected ' + JSON.stringify(args) + '\\n'); process.exit(2);
`;

describe('libvirt list() while domains come and go', () => {
  let dir: string;
  let virsh: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'fake-virsh-'));
    virsh = path.join(dir, 'virsh');
    await writeFile(virsh, FAKE_VIRSH);
    await chmod(virsh, 0o755);
  });
  afterAll(async () => rm(dir, { recursive: true, force: true }));

  it('lists the domains still there when one vanishes between the two calls', async () => {
    const hv = new LibvirtHypervisor({
      virsh,
      uri: 'qemu:///system',
      qemuImg: new QemuImg('/bin/false'),
      commandTimeoutMs: 10_000,
      jobTimeoutMs: 10_000,
      shutdownTimeoutMs: 10_000,
      log: silentLogger(),
    });
    const list = await hv.list();
    expect(list).toEqual([{ uuid: KEPT, name: 'kept', state: 'running' }]);
  });
});
