import type { Config } from '../config/schema.js';
import type { Logger } from '../log.js';
import { fromConfig as libvirtFromConfig } from './libvirt/libvirt-hypervisor.js';
import { fromConfig as qemuFromConfig, type QemuHypervisor } from './qemu/qemu-hypervisor.js';
import type { Hypervisor } from './types.js';

/** The backend `[hypervisor] driver` names; the qemu one is also returned as such (it creates instances). */
export function hypervisorFromConfig(config: Config, log: Logger): { hv: Hypervisor; qemu?: QemuHypervisor } {
  switch (config.hypervisor.driver) {
    case 'qemu': {
      const qemu = qemuFromConfig(config, log);
      return { hv: qemu, qemu };
    }
    case 'libvirt':
      return { hv: libvirtFromConfig(config, log) };
  }
}
